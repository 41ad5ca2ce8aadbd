//! The web home at `https://<domain>/` end to end: the real daemon, the
//! real gateway, Debian's Chromium driven by Selenium (screenshots at phone
//! and desktop sizes, axe-core's accessibility check on every page), real
//! IMAP logins with Python's `imaplib`, and the real git client pushing to
//! a blog whose route is revoked on the page. The security checks use curl.

use std::collections::HashMap;
use std::path::PathBuf;

use granary_testkit::mail::{DOMAIN, MailHost, run_python};
use granary_testkit::{Daemon, GitClient};

const ALICE_PASSWORD: &str = "alice's long account password";

/// Alice and Bob with passwords; `admin` has the admin pages.
fn host(admin: &str) -> MailHost {
    let h = MailHost::start(
        &["alice", "bob"],
        &[],
        "",
        &format!("[web]\nadmins = [\"{admin}\"]"),
    );
    for (user, password) in [
        ("alice", ALICE_PASSWORD),
        ("bob", "bob's long account password"),
    ] {
        h.daemon
            .granary_with_stdin(
                &["user", "passwd", user, "--password-stdin"],
                Some(password),
            )
            .success();
    }
    h
}

fn artifacts(name: &str) -> String {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("../test-artifacts")
        .join(name)
        .display()
        .to_string()
}

/// axe-core from npm (`tests/browser`, installed by `./run-tests`).
fn axe() -> PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("browser/node_modules/axe-core/axe.min.js");
    assert!(
        p.exists(),
        "{} is missing: ./run-tests installs it (npm ci in tests/browser)",
        p.display()
    );
    p
}

const BROWSER: &str = r##"
import base64, hashlib, hmac, imaplib, os, ssl, struct, subprocess, tempfile, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from selenium.common.exceptions import WebDriverException

BASE = os.environ["BASE"]
art = os.environ["ARTIFACTS"]
os.makedirs(art, exist_ok=True)
AXE = open(os.environ["AXE"]).read()
spki = subprocess.run(
    "openssl x509 -in \"$CA\" -pubkey -noout | openssl pkey -pubin -outform der "
    "| openssl dgst -sha256 -binary | base64", shell=True, check=True,
    capture_output=True, text=True).stdout.strip()
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--no-first-run", f"--user-data-dir={tempfile.mkdtemp()}",
          f"--host-resolver-rules=MAP {os.environ['DOMAIN']} 127.0.0.1",
          f"--ignore-certificate-errors-spki-list={spki}"):
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
SIZES = (("phone", 390, 844), ("desktop", 1280, 900))
checked = set()

def h1():
    return driver.find_element(By.TAG_NAME, "h1").text

def body():
    return driver.find_element(By.TAG_NAME, "body").text

def accessible():
    # axe-core in the page (through the driver: the page's CSP allows no
    # script of its own); serious or critical findings fail.
    driver.execute_script(AXE)
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map("
        "v => [v.id, v.impact, v.nodes.length, v.help])))")
    bad = [v for v in found if v[1] in ("serious", "critical")]
    assert not bad, (driver.current_url, bad)

def shots(name):
    for size, w, h in SIZES:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": w, "height": h, "deviceScaleFactor": 1, "mobile": size == "phone"})
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= w, (name, size, width)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "format": "png"})
        with open(os.path.join(art, f"{name}-{size}.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    if name not in checked:
        accessible()
        checked.add(name)

def gone(element):
    # Whether the page `element` was on has been replaced. Chromium may
    # answer a node of the old page with an inspector error rather than
    # "stale element" (EC.staleness_of lets that one through): gone too.
    try:
        element.is_enabled()
        return False
    except WebDriverException:
        return True

def submit(button_text):
    # Clicks the button and waits for the page its form loads (a click
    # returns before the navigation ends).
    page = driver.find_element(By.TAG_NAME, "html")
    for b in driver.find_elements(By.TAG_NAME, "button"):
        if b.text == button_text or b.get_attribute("aria-label") == button_text:
            b.click()
            WebDriverWait(driver, 20).until(lambda _: gone(page))
            return
    raise AssertionError((button_text, body()))

def fill(field_id, value):
    el = driver.find_element(By.ID, field_id)
    label = driver.find_element(By.CSS_SELECTOR, f"label[for='{field_id}']")
    assert label.text, field_id
    el.clear()
    el.send_keys(value)

def totp(secret, step):
    key = base64.b32decode(secret + "=" * ((8 - len(secret) % 8) % 8))
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7fffffff) % 1000000)

def imap_login(password):
    ctx = ssl.create_default_context(cafile=os.environ["CA"])
    m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
    try:
        m.login("alice", password)
        m.logout()
        return True
    except imaplib.IMAP4.error:
        return False

def sign_in():
    driver.get(BASE + "/")
    assert h1().startswith("Sign in"), body()
    fill("user", "alice")
    fill("password", os.environ["PASSWORD"])
    submit("Sign in")

try:
    driver.get(BASE + "/")
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    assert driver.find_elements(By.TAG_NAME, "script") == []
    shots("sign-in")
    # A wrong password says so, and signs nobody in.
    fill("user", "alice"); fill("password", "not her password"); submit("Sign in")
    assert "Wrong user name or password." in body(), body()
    # 1. Alice signs in and adds a mail device; its password is shown once.
    sign_in()
    assert h1() == "Your grains", body()
    assert "Mail (IMAP and SMTP)" in body()
    shots("home")
    driver.get(BASE + "/devices")
    shots("devices")
    fill("label", "Phone")
    submit("Add device")
    assert h1() == "Your new device", body()
    password = driver.find_element(By.ID, "password").text.strip()
    assert len(password) >= 20, password
    assert "IMAP server (TLS)" in body() and "alice@" in body(), body()
    assert driver.find_elements(By.CSS_SELECTOR, "svg.qr[role=img][aria-label]")
    shots("device-added")
    # 2. imaplib logs in with it.
    assert imap_login(password)
    # 3. She revokes the device, and the login fails.
    driver.get(BASE + "/devices")
    assert "Phone" in body()
    submit("Revoke Phone")
    assert "Device revoked" in body(), body()
    assert "Phone" not in driver.find_element(By.TAG_NAME, "main").text.split("Your devices")[1]
    assert not imap_login(password)
    # 4. She turns on TOTP, signs out, and signs in with a code.
    driver.get(BASE + "/security")
    shots("security")
    submit("Set up two-step sign-in")
    secret = driver.find_element(By.ID, "totp-secret").text.strip()
    qr = driver.find_element(By.CSS_SELECTOR, "svg.qr")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", qr)
    for attempt in range(3):
        qr.screenshot(os.path.join(art, "totp-qr.png"))
        uri = subprocess.run(["zbarimg", "--quiet", "--raw", os.path.join(art, "totp-qr.png")],
                             capture_output=True, text=True).stdout.strip()
        if uri:
            break
    assert uri.startswith("otpauth://totp/") and f"secret={secret}" in uri, uri
    shots("totp-setup")
    enabled_at = int(time.time() // 30)
    fill("code", totp(secret, enabled_at))
    submit("Turn on")
    codes = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#recovery li")]
    assert len(codes) == 10, driver.find_element(By.TAG_NAME, "main").text
    shots("totp-on")
    submit("Sign out alice")
    assert h1().startswith("Sign in")
    sign_in()
    assert h1() == "Enter your code", body()
    shots("code")
    # The code that turned it on is spent; a later one works.
    fill("code", totp(secret, enabled_at))
    submit("Continue")
    assert "Wrong code." in body(), body()
    fill("code", totp(secret, max(int(time.time() // 30), enabled_at + 1)))
    submit("Continue")
    assert h1() == "Your grains", body()
    # 5. She revokes the grant that tells her blog about pushes.
    driver.get(BASE + "/grants")
    assert "notify:site" in body(), body()
    shots("grants")
    submit("Revoke the grant from alice-git to alice-blog")
    assert "Grant revoked." in body(), body()
    assert "notify:site" not in body()
    driver.get(BASE + "/keys")
    shots("keys")
    driver.get(BASE + "/invites")
    shots("invites")
    # The admin pages (Alice is an admin here): add a user, see it logged.
    driver.get(BASE + "/admin")
    assert h1() == "Admin" and "This node" in body(), body()
    shots("admin")
    driver.get(BASE + "/admin/users")
    fill("name", "dora")
    submit("Add user")
    assert "dora added" in body(), body()
    shots("admin-users")
    driver.get(BASE + "/admin/audit?action=user")
    assert "user.add" in body() and "dora" in body(), body()
    shots("admin-audit")
    driver.get(BASE + "/admin/grains")
    assert "alice/mail" in body(), body()
    shots("admin-grains")
except Exception:
    # What the page showed when it went wrong, for the test's output.
    try:
        driver.save_screenshot(os.path.join(art, "failure.png"))
        print("FAILED at", driver.current_url, "\n", driver.find_element(By.TAG_NAME, "body").text)
    except Exception as e:
        print("and the page could not be read:", e)
    raise
finally:
    driver.quit()
print("ok")
"##;

/// Pushes version `n` of Alice's site.
fn push(client: &GitClient<'_>, work: &std::path::Path, url: &str, n: u32) {
    std::fs::write(work.join("index.html"), format!("<h1>version {n}</h1>\n")).unwrap();
    if n == 1 {
        client.ok(work, &["init", "-q"]);
        client.ok(work, &["add", "."]);
    }
    client.ok(work, &["commit", "-q", "-a", "-m", &format!("v{n}")]);
    client.ok(work, &["push", "-q", url, "main"]);
}

fn blog_shows(daemon: &Daemon, n: u32) {
    granary_testkit::eventually(
        &format!("version {n} on the blog"),
        std::time::Duration::from_secs(30),
        || {
            let (code, body) = daemon.curl(&format!("alice.{DOMAIN}"), "/", &[]);
            (code == "200" && body.contains(&format!("version {n}"))).then_some(())
        },
    );
}

#[test]
fn alice_uses_her_web_home_in_a_browser() {
    let h = host("alice");
    let d = &h.daemon;
    let tmp = tempfile::tempdir().unwrap();
    for pkg in [
        granary_testkit::git_package(tmp.path()),
        granary_testkit::app_package(tmp.path(), "blog", "granary-blog", ""),
    ] {
        d.granary(&["app", "install", pkg.to_str().unwrap()])
            .success();
    }
    for (from, to, cap) in [
        ("alice/blog", "alice/git", "git.read:site"),
        ("alice/git", "alice/blog", "notify:site"),
    ] {
        d.granary(&["grant", "add", "--from", from, "--to", to, "--cap", cap])
            .success();
    }
    let git_password = granary_testkit::app_password(d, "alice", "git");
    let client = GitClient {
        daemon: d,
        home: tmp.path().join("home"),
        domain: DOMAIN,
    };
    std::fs::create_dir_all(&client.home).unwrap();
    let work = tmp.path().join("site");
    std::fs::create_dir_all(&work).unwrap();
    let url = client.url(Some(("alice", &git_password)), "alice/site.git");
    push(&client, &work, &url, 1);
    blog_shows(d, 1);

    let art = artifacts("web-home");
    let mut env = h.client_env("alice", "");
    env.retain(|(k, _)| *k != "PASSWORD");
    env.extend([
        (
            "BASE",
            format!("https://{DOMAIN}:{}", d.https_addr().port()),
        ),
        ("DOMAIN", DOMAIN.to_owned()),
        ("PASSWORD", ALICE_PASSWORD.to_owned()),
        ("ARTIFACTS", art.clone()),
        ("AXE", axe().display().to_string()),
    ]);
    let env: Vec<(&str, String)> = env.into_iter().collect();
    let (ok, out) = run_python(BROWSER, &env);
    assert!(ok && out.lines().any(|l| l.trim() == "ok"), "{out}");
    eprintln!("screenshots: {art}");

    // The revoked route: the git grain may no longer tell the blog.
    push(&client, &work, &url, 2);
    granary_testkit::eventually(
        "the refused notification",
        std::time::Duration::from_secs(20),
        || {
            let logs = d.granary(&["grain", "logs", "alice/git"]).success().stdout;
            logs.contains("no notify:site route").then_some(())
        },
    );
    let (_, body) = d.curl(&format!("alice.{DOMAIN}"), "/", &[]);
    assert!(body.contains("version 1"), "{body}");
}

/// A response's status, headers (lower-case names; `set-cookie` joined by
/// newlines) and body, by curl against the domain.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

fn request(
    d: &Daemon,
    method: &str,
    path: &str,
    cookies: &str,
    form: &str,
    origin: Option<&str>,
) -> Answer {
    request_at(d, DOMAIN, method, path, cookies, form, origin)
}

/// [`request`] to another domain's web home.
fn request_at(
    d: &Daemon,
    domain: &str,
    method: &str,
    path: &str,
    cookies: &str,
    form: &str,
    origin: Option<&str>,
) -> Answer {
    let port = d.https_addr().port();
    let mut args: Vec<String> = vec![
        "--silent".into(),
        "--show-error".into(),
        "--include".into(),
        "--resolve".into(),
        format!("{domain}:{port}:127.0.0.1"),
        "--cacert".into(),
        d.ca_file().display().to_string(),
        "--request".into(),
        method.into(),
    ];
    if !cookies.is_empty() {
        args.extend(["--cookie".into(), cookies.into()]);
    }
    if method == "POST" {
        args.extend(["--data-raw".into(), form.into()]);
        let o = origin.map_or(format!("https://{domain}:{port}"), str::to_owned);
        args.extend(["--header".into(), format!("Origin: {o}")]);
    }
    args.push(format!("https://{domain}:{port}{path}"));
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap();
    let mut headers: HashMap<String, String> = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let e = headers.entry(k.trim().to_ascii_lowercase()).or_default();
            if !e.is_empty() {
                e.push('\n');
            }
            e.push_str(v.trim());
        }
    }
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `name=value` of a `Set-Cookie` for `name`.
fn set_cookie(a: &Answer, name: &str) -> Option<String> {
    a.headers
        .get("set-cookie")?
        .lines()
        .find(|l| l.starts_with(&format!("{name}=")))
        .map(|l| l.split(';').next().unwrap().to_owned())
}

/// The value of the form field `name="csrf"` on a page.
fn csrf(body: &str) -> String {
    let at = body.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    body[at..].split('"').next().unwrap().to_owned()
}

/// Signs `user` in with curl; the session cookie.
fn sign_in(d: &Daemon, user: &str, password: &str, planted: &str) -> String {
    sign_in_at(d, DOMAIN, user, password, planted)
}

/// [`sign_in`] on another domain's web home.
fn sign_in_at(d: &Daemon, domain: &str, user: &str, password: &str, planted: &str) -> String {
    let request = |d: &Daemon, method: &str, path: &str, cookies: &str, form: &str, origin| {
        request_at(d, domain, method, path, cookies, form, origin)
    };
    let page = request(d, "GET", "/", planted, "", None);
    let pre = set_cookie(&page, "__Host-granary-pre").unwrap();
    let token = csrf(&page.body);
    let cookies = if planted.is_empty() {
        pre
    } else {
        format!("{pre}; {planted}")
    };
    let a = request(
        d,
        "POST",
        "/signin",
        &cookies,
        &format!(
            "csrf={token}&user={user}&password={}",
            password.replace(' ', "+").replace('\'', "%27")
        ),
        None,
    );
    assert_eq!(a.status, 303, "{}", a.body);
    set_cookie(&a, "__Host-granary").expect("a session cookie")
}

#[test]
fn the_web_home_refuses_what_it_must() {
    let h = host("bob");
    let d = &h.daemon;
    // Headers on every page; cookie flags.
    let page = request(d, "GET", "/", "", "", None);
    assert_eq!(page.status, 200);
    let csp = &page.headers["content-security-policy"];
    for want in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(want), "{csp}");
    }
    assert!(page.headers["strict-transport-security"].contains("max-age="));
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    let raw = page.headers["set-cookie"].clone();
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(raw.contains(flag), "{raw}");
    }

    // Session fixation: a planted cookie is never promoted.
    let planted = "__Host-granary=planted-by-someone-else";
    let session = sign_in(d, "alice", ALICE_PASSWORD, planted);
    assert_ne!(session, planted);
    let home = request(d, "GET", "/", &session, "", None);
    assert!(home.body.contains("Your grains"), "{}", home.body);
    let stranger = request(d, "GET", "/", planted, "", None);
    assert!(stranger.body.contains("<h1>Sign in"), "{}", stranger.body);

    // CSRF: another origin, or no token, is refused; nothing is added.
    let devices = request(d, "GET", "/devices", &session, "", None);
    let token = csrf(&devices.body);
    let form = format!("csrf={token}&kind=mail&label=Laptop");
    let evil = request(
        d,
        "POST",
        "/devices",
        &session,
        &form,
        Some("https://evil.test"),
    );
    assert_eq!(evil.status, 403, "{}", evil.body);
    let tokenless = request(
        d,
        "POST",
        "/devices",
        &session,
        "kind=mail&label=Laptop",
        None,
    );
    assert_eq!(tokenless.status, 403);
    let listed = d
        .granary(&["app-password", "list", "alice", "--json"])
        .success()
        .stdout;
    assert!(!listed.contains("Laptop"), "{listed}");
    let ok = request(d, "POST", "/devices", &session, &form, None);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("Your new device"));

    // Bob's device id in Alice's URL: 404, and his device stays.
    let bob = d
        .granary(&[
            "app-password",
            "add",
            "bob",
            "--kind",
            "mail",
            "--label",
            "bobs",
            "--json",
        ])
        .success()
        .json();
    let bob_id = bob["app_password"]["id"]
        .as_i64()
        .or(bob["id"].as_i64())
        .expect("an id");
    let theirs = request(
        d,
        "POST",
        &format!("/devices/{bob_id}/revoke"),
        &session,
        &format!("csrf={token}"),
        None,
    );
    assert_eq!(theirs.status, 404, "{}", theirs.body);
    let bobs = d
        .granary(&["app-password", "list", "bob", "--json"])
        .success()
        .stdout;
    assert!(bobs.contains("bobs"), "{bobs}");
    // No admin pages for Alice (Bob is the admin), nor their forms.
    let refused = request(d, "GET", "/admin", &session, "", None);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        !refused.body.contains("Admin</a>"),
        "no link to them either"
    );
    let made = request(
        d,
        "POST",
        "/admin/users",
        &session,
        &format!("csrf={token}&name=mallory"),
        None,
    );
    assert_eq!(made.status, 403, "{}", made.body);

    // Bob's admin pages: add a user whose password works, see it in the
    // audit log, and nothing from another origin.
    let bob_session = sign_in(d, "bob", "bob's long account password", "");
    let overview = request(d, "GET", "/admin", &bob_session, "", None);
    assert_eq!(overview.status, 200, "{}", overview.body);
    assert!(overview.body.contains("This node") && overview.body.contains("Admin</a>"));
    let bob_token = csrf(&overview.body);
    let evil = request(
        d,
        "POST",
        "/admin/users",
        &bob_session,
        &format!("csrf={bob_token}&name=mallory"),
        Some("https://evil.test"),
    );
    assert_eq!(evil.status, 403);
    let added = request(
        d,
        "POST",
        "/admin/users",
        &bob_session,
        &format!("csrf={bob_token}&name=carol"),
        None,
    );
    assert_eq!(added.status, 200, "{}", added.body);
    let at = added
        .body
        .find("<p class=\"secret\">")
        .expect("the password")
        + 18;
    let carol_password = added.body[at..].split('<').next().unwrap().to_owned();
    d.granary_with_stdin(&["user", "check-password", "carol"], Some(&carol_password))
        .success();
    let users = d.granary(&["user", "list", "--json"]).success().stdout;
    assert!(!users.contains("mallory"), "{users}");
    let audit = request(
        d,
        "GET",
        "/admin/audit?action=user&subject=carol",
        &bob_session,
        "",
        None,
    );
    assert!(audit.body.contains("user.add"), "{}", audit.body);
    // Done on the page, so logged as Bob's; carol's grains were made too,
    // but those are grain events.
    assert!(audit.body.contains("web:bob"), "{}", audit.body);
    // The CLI reads the same log.
    let logged = d
        .granary(&["audit", "--action", "user", "--subject", "carol", "--json"])
        .success()
        .json();
    assert_eq!(logged[0]["action"], "user.add", "{logged:#}");
    assert_eq!(logged[0]["actor"], "web:bob", "{logged:#}");
    assert!(
        !audit.body.contains("grain.create"),
        "filtered to user events"
    );
    let grains = request(
        d,
        "GET",
        "/admin/audit?subject=carol",
        &bob_session,
        "",
        None,
    );
    assert!(grains.body.contains("grain.create"), "{}", grains.body);
    // An app upgraded from the page: the mail app's next version, signed
    // by the same key, from a package file on the server.
    let def = h.dir.path().join("mail-package.toml");
    let next = std::fs::read_to_string(&def)
        .unwrap()
        .replace("version = \"0.1.0\"", "version = \"0.2.0\"");
    std::fs::write(&def, next).unwrap();
    let v2 = h.dir.path().join("mail-0.2.0.gpkg");
    let key = h.dir.path().join("mail.key");
    granary_testkit::run_granary(
        &[
            "pack",
            "build",
            def.to_str().unwrap(),
            "-o",
            v2.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        None,
    )
    .success();
    let relative = request(
        d,
        "POST",
        "/admin/apps",
        &bob_session,
        &format!("csrf={bob_token}&path=mail-0.2.0.gpkg"),
        None,
    );
    assert!(relative.body.contains("full path"), "{}", relative.body);
    let upgraded = request(
        d,
        "POST",
        "/admin/apps",
        &bob_session,
        &format!("csrf={bob_token}&path={}", v2.display()),
        None,
    );
    assert!(
        upgraded.body.contains("mail upgraded from 0.1.0 to 0.2.0"),
        "{}",
        upgraded.body
    );
    let apps = d.granary(&["app", "list", "--json"]).success().json();
    assert!(apps.to_string().contains("0.2.0"), "{apps:#}");
    let again = request(
        d,
        "POST",
        "/admin/apps",
        &bob_session,
        &format!("csrf={bob_token}&path={}", v2.display()),
        None,
    );
    assert!(again.body.contains("is not newer"), "{}", again.body);
    // A kind not installed yet is installed.
    let hello = granary_testkit::app_package(h.dir.path(), "hello", "granary-hello", "");
    let installed = request(
        d,
        "POST",
        "/admin/apps",
        &bob_session,
        &format!("csrf={bob_token}&path={}", hello.display()),
        None,
    );
    assert!(
        installed.body.contains("hello 0.1.0 installed."),
        "{}",
        installed.body
    );
    // Nothing but a regular file is opened.
    let fifo = request(
        d,
        "POST",
        "/admin/apps",
        &bob_session,
        &format!("csrf={bob_token}&path=/dev/null"),
        None,
    );
    assert!(fifo.body.contains("is not a regular file"), "{}", fifo.body);
    // Plain storage has no quotas: the page and the CLI say so.
    let quota = request(
        d,
        "POST",
        "/admin/grains/alice-mail/quota",
        &bob_session,
        &format!("csrf={bob_token}&size=1G"),
        None,
    );
    assert!(
        quota.body.contains("plain directories have no quotas"),
        "{}",
        quota.body
    );
    let cli = d.granary(&["grain", "quota", "alice/mail", "1G"]).failure();
    assert!(
        cli.stderr.contains("plain directories have no quotas"),
        "{cli}"
    );
    for page in [
        "/admin/users",
        "/admin/grains",
        "/admin/apps",
        "/admin/backups",
    ] {
        let a = request(d, "GET", page, &bob_session, "", None);
        assert_eq!(a.status, 200, "{page}: {}", a.body);
    }

    // Signing out ends the session on the server.
    let out = request(
        d,
        "POST",
        "/signout",
        &session,
        &format!("csrf={token}"),
        None,
    );
    assert_eq!(out.status, 303);
    let after = request(d, "GET", "/devices", &session, "", None);
    assert_eq!(after.status, 303, "signed out: back to the sign-in page");

    // Ten wrong passwords from one address: refused (429) before checking.
    for _ in 0..10 {
        let page = request(d, "GET", "/", "", "", None);
        let pre = set_cookie(&page, "__Host-granary-pre").unwrap();
        let a = request(
            d,
            "POST",
            "/signin",
            &pre,
            &format!("csrf={}&user=alice&password=wrong", csrf(&page.body)),
            None,
        );
        assert_eq!(a.status, 401);
    }
    let page = request(d, "GET", "/", "", "", None);
    let pre = set_cookie(&page, "__Host-granary-pre").unwrap();
    let a = request(
        d,
        "POST",
        "/signin",
        &pre,
        &format!("csrf={}&user=alice&password=x", csrf(&page.body)),
        None,
    );
    assert_eq!(a.status, 429, "{}", a.body);
}

/// Disabling a user shuts them out of every login while keeping what
/// they have: an open IMAP session ends (their grain stops), the same app
/// password fails at once, their web session ends and the account
/// password no longer signs in, and mail to them is still taken. (SSH
/// keys and the other lookups: the state's unit test; another node's
/// cache: the cluster's git test.)
/// Enabled again from the admin page, everything works as before,
/// including the mail that came meanwhile.
#[test]
fn a_disabled_user_is_shut_out_everywhere_until_enabled() {
    let h = host("bob");
    let d = &h.daemon;
    let password = h.password("alice");
    let session = sign_in(d, "alice", ALICE_PASSWORD, "");
    let script = r#"
import imaplib, os, smtplib, ssl, subprocess
ctx = ssl.create_default_context(cafile=os.environ["CA"])
def login():
    m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
    m.login(os.environ["USER"], os.environ["PASSWORD"])
    return m
def granary(*args):
    r = subprocess.run([os.environ["GRANARY"], "--config", os.environ["CONFIG"], *args],
                       capture_output=True, text=True)
    assert r.returncode == 0, r
    return r.stdout.strip()
held = login()
assert held.select("INBOX")[0] == "OK"
print("DISABLE", granary("user", "disable", "alice"))
print("AGAIN", granary("user", "disable", "alice"))
try:
    held.noop()
    print("HELD still open")
except (imaplib.IMAP4.abort, OSError) as e:
    print("HELD cut")
try:
    login()
    print("LOGIN passed")
except imaplib.IMAP4.error as e:
    print("LOGIN refused", e)
s = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_PORT"]))
s.ehlo("client.remote.example")
s.sendmail("sender@remote.example", ["alice@example.org"], "Subject: while away\r\n\r\nbody\r\n")
s.quit()
print("MAIL taken")
"#;
    let mut env = h.client_env("alice", &password);
    env.push((
        "GRANARY",
        granary_testkit::granary_bin().display().to_string(),
    ));
    env.push(("CONFIG", d.config_path().display().to_string()));
    let (ok, out) = run_python(script, &env);
    assert!(ok, "{out}");
    assert!(
        out.contains("DISABLE disabled alice; stopped their 1 running grain(s)"),
        "{out}"
    );
    assert!(out.contains("AGAIN alice was already disabled"), "{out}");
    assert!(out.contains("HELD cut"), "{out}");
    assert!(out.contains("LOGIN refused"), "{out}");
    assert!(out.contains("MAIL taken"), "{out}");
    h.wait_for("alice", "INBOX", 1);
    let users = d.granary(&["user", "list", "--json"]).success().json();
    let alice = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .unwrap();
    assert!(alice["disabled_at"].as_i64().unwrap() > 0, "{users:#}");
    let listed = d.granary(&["user", "list"]).success().stdout;
    assert!(listed.contains("disabled 20"), "{listed}");

    // The web: the open session ends, and the password signs in no more.
    let after = request(d, "GET", "/devices", &session, "", None);
    assert_eq!(after.status, 303, "the session ended");
    let page = request(d, "GET", "/", "", "", None);
    let pre = set_cookie(&page, "__Host-granary-pre").unwrap();
    let form = format!(
        "csrf={}&user=alice&password={}",
        csrf(&page.body),
        ALICE_PASSWORD.replace(' ', "+").replace('\'', "%27")
    );
    let refused = request(d, "POST", "/signin", &pre, &form, None);
    assert_eq!(refused.status, 401, "{}", refused.body);

    // Bob, the admin, sees her disabled, cannot disable himself, and
    // enables her.
    let bob = sign_in(d, "bob", "bob's long account password", "");
    let users = request(d, "GET", "/admin/users", &bob, "", None);
    assert!(users.body.contains("Disabled since"), "{}", users.body);
    let token = csrf(&users.body);
    let himself = request(
        d,
        "POST",
        "/admin/users/bob/disable",
        &bob,
        &format!("csrf={token}"),
        None,
    );
    assert!(
        himself.body.contains("You cannot disable yourself here."),
        "{}",
        himself.body
    );
    let enabled = request(
        d,
        "POST",
        "/admin/users/alice/enable",
        &bob,
        &format!("csrf={token}"),
        None,
    );
    assert!(enabled.body.contains("alice enabled."), "{}", enabled.body);
    let read = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
print("GOT", data[0][1].decode().strip())
"#;
    let (ok, out) = run_python(read, &h.client_env("alice", &password));
    assert!(ok, "{out}");
    assert!(out.contains("GOT Subject: while away"), "{out}");
    sign_in(d, "alice", ALICE_PASSWORD, "");
    let logged = d
        .granary(&["audit", "--subject", "alice", "--json"])
        .success()
        .json();
    let actions: Vec<(String, String)> = logged
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("user.disable".into(), "admin".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("user.enable".into(), "web:bob".into())),
        "{actions:?}"
    );
}

/// A task list added on the page: its client id and `.taskrc` lines are
/// shown once (and downloadable), taskchampion-py syncs with them through
/// the real gateway, and once it is revoked on the page the sync fails.
#[test]
fn a_task_list_added_on_the_page_syncs_until_revoked() {
    use granary_testkit::tasks::{DOMAIN as TASKS_DOMAIN, TasksHost};
    let host = TasksHost::start(&["alice", "bob"], "", "");
    let d = &host.daemon;
    d.granary_with_stdin(
        &["user", "passwd", "alice", "--password-stdin"],
        Some(ALICE_PASSWORD),
    )
    .success();
    let at = |method: &str, path: &str, cookies: &str, form: &str| {
        request_at(d, TASKS_DOMAIN, method, path, cookies, form, None)
    };
    let session = sign_in_at(d, TASKS_DOMAIN, "alice", ALICE_PASSWORD, "");
    let devices = at("GET", "/devices", &session, "");
    assert!(
        devices.body.contains("Tasks (Taskwarrior 3 sync)"),
        "{}",
        devices.body
    );
    let token = csrf(&devices.body);
    let added = at(
        "POST",
        "/devices",
        &session,
        &format!("csrf={token}&kind=tasks&label=Laptop"),
    );
    assert_eq!(added.status, 200, "{}", added.body);
    let start = added
        .body
        .find("sync.server.client_id=")
        .expect("the .taskrc lines")
        + 22;
    let client = added.body[start..start + 36].to_owned();
    assert!(
        added
            .body
            .contains(&format!("sync.server.url=https://tasks.{TASKS_DOMAIN}:"))
    );
    let file = at(
        "POST",
        "/devices/download",
        &session,
        &format!("csrf={token}&what=taskrc&kind=tasks&client={client}"),
    );
    assert_eq!(
        file.headers["content-disposition"],
        "attachment; filename=\"granary.taskrc\""
    );
    assert!(
        file.body
            .contains(&format!("sync.server.client_id={client}\n")),
        "{}",
        file.body
    );

    // Taskwarrior 3's sync library, with that client id.
    const SYNC: &str = r#"
import os, uuid
import taskchampion as tc
r = tc.Replica.new_on_disk(os.environ["TC_DIR"], True)
ops = tc.Operations()
t = r.create_task(str(uuid.uuid4()), ops)
t.set_description("water the plants", ops)
r.commit_operations(ops)
r.sync_to_remote(os.environ["TC_URL"], os.environ["TC_CLIENT"], "a secret of alice's", False)
print("synced")
"#;
    let replica = host.dir.path().join("laptop");
    std::fs::create_dir_all(&replica).unwrap();
    let env = [
        ("TC_DIR", replica.display().to_string()),
        ("TC_CLIENT", client.clone()),
    ];
    let (ok, out) = host.python(SYNC, &env);
    assert!(ok && out.contains("synced"), "{out}");

    // Listed with its last sync; Bob cannot revoke it; Alice can.
    let listed = at("GET", "/devices", &session, "");
    let form_at = listed.body.find("/devices/tasks/").expect("a revoke form") + 15;
    let id: String = listed.body[form_at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(listed.body.contains("Laptop"));
    d.granary_with_stdin(
        &["user", "passwd", "bob", "--password-stdin"],
        Some("bob's long account password"),
    )
    .success();
    let bob = sign_in_at(d, TASKS_DOMAIN, "bob", "bob's long account password", "");
    let bob_token = csrf(&at("GET", "/devices", &bob, "").body);
    let theirs = at(
        "POST",
        &format!("/devices/tasks/{id}/revoke"),
        &bob,
        &format!("csrf={bob_token}"),
    );
    assert_eq!(theirs.status, 404, "{}", theirs.body);
    let (ok, out) = host.python(SYNC, &env);
    assert!(ok, "still Alice's: {out}");
    let revoked = at(
        "POST",
        &format!("/devices/tasks/{id}/revoke"),
        &session,
        &format!("csrf={token}"),
    );
    assert!(
        revoked.body.contains("Task list revoked"),
        "{}",
        revoked.body
    );
    // The gateway remembers a client id it found for 2 s.
    granary_testkit::eventually(
        "the revoked client id to stop syncing",
        std::time::Duration::from_secs(10),
        || (!host.python(SYNC, &env).0).then_some(()),
    );
}
