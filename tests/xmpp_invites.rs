//! Invites end to end: `granary invite create`, the token redeemed by
//! in-band registration from `slixmpp` (XEP-0077 with the XEP-0445
//! preauth step, as Conversations does it), the roster both ways for a
//! contact invite, every kind of bad token refused the same way, and the
//! landing page in headless Chromium (Selenium with Debian's
//! chromium-driver) at phone and desktop sizes, its QR codes decoded by
//! `zbarimg`; an existing user taking a contact invite by
//! pre-authenticated subscription (XEP-0379).

use granary_testkit::xmpp::NEWCOMER as REGISTER;
use granary_testkit::xmpp::XmppHost;

fn host(users: &[&str]) -> XmppHost {
    XmppHost::start(users, "[grains]\nidle_timeout = \"60s\"\n")
}

/// An invite made with the CLI: (link, xmpp: URI, token).
fn invite(h: &XmppHost, args: &[&str]) -> (String, String, String) {
    h.invite(args)
}

fn invites_json(h: &XmppHost) -> serde_json::Value {
    let out = h.daemon.granary(&["invite", "list", "--json"]).success();
    serde_json::from_str(&out.stdout).unwrap()
}

/// The landing page of `token` with curl: the body, then the status on
/// a line of its own.
fn page(h: &XmppHost, token: &str) -> String {
    let port = h.daemon.https_addr().port();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(h.daemon.ca_file())
        .arg("--resolve")
        .arg(format!("chat.test:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://chat.test:{port}/invite/{token}"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn check(h: &XmppHost, script: &str, env: &[(&str, String)]) {
    let (ok, out) = h.python_with(script, env);
    assert!(ok, "the client script failed:\n{out}");
}

#[test]
fn a_contact_invite_makes_the_account_and_both_rosters() {
    let h = host(&["alice"]);
    let (link, uri, token) = invite(&h, &["--for", "alice"]);
    assert!(link.starts_with("https://chat.test:"), "{link}");
    assert_eq!(
        uri,
        format!("xmpp:alice@chat.test?roster;preauth={token};ibr=y")
    );
    let script = format!(
        "{REGISTER}{}",
        r#"
async def main():
    alice = await Client("alice", "laptop").online()
    friend = Newcomer("friend", "a friend's passphrase", os.environ["TOKEN"])
    await friend.online()
    assert friend.registered.result() is True
    # Each sees the other's presence, without asking or approving anything.
    await next_of(alice.presences, lambda p: p["from"].bare == "friend@chat.test")
    await next_of(friend.presences, lambda p: p["from"].bare == "alice@chat.test")
    await alice.get_roster()
    assert alice.client_roster["friend@chat.test"]["subscription"] == "both", alice.client_roster
    assert friend.client_roster["alice@chat.test"]["subscription"] == "both", friend.client_roster
    friend.send_message(mto="alice@chat.test", mbody="thanks for the invite", mtype="chat")
    m = await next_of(alice.messages, lambda m: m["body"] == "thanks for the invite")
    assert m["from"].bare == "friend@chat.test"
    # The password the app chose logs in again (it is an xmpp app password).
    again = Client("friend", "laptop", password="a friend's passphrase")
    await again.online()
    for c in (alice, friend, again):
        c.disconnect()

run(main)
"#
    );
    check(&h, &script, &[("TOKEN", token.clone())]);
    let list = invites_json(&h);
    let it = &list[0];
    assert_eq!(it["kind"], "contact");
    assert_eq!(it["inviter"], "alice");
    assert_eq!(it["status"], "used");
    assert_eq!(it["used_by"], serde_json::json!(["friend"]));
    // The new user exists, with one app password: of kind xmpp.
    let out = h
        .daemon
        .granary(&["app-password", "list", "friend", "--json"])
        .success()
        .stdout;
    let passwords: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(passwords.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(passwords[0]["kind"], "xmpp", "{out}");
}

#[test]
fn bad_tokens_all_fail_alike_and_spend_nothing() {
    let h = host(&["alice"]);
    // Used: an account invite spent by carol.
    let (_, uri, used) = invite(&h, &[]);
    assert_eq!(uri, format!("xmpp:chat.test?register;preauth={used}"));
    // Revoked.
    let (_, _, revoked) = invite(&h, &["--for", "alice"]);
    let id = invites_json(&h)[0]["id"].as_i64().unwrap();
    h.daemon
        .granary(&["invite", "revoke", &id.to_string()])
        .success();
    // Expired: a one-second invite, once the list says it has expired.
    let (_, _, expired) = invite(&h, &["--expires", "1s"]);
    granary_testkit::eventually(
        "the one-second invite to expire",
        std::time::Duration::from_secs(10),
        || (invites_json(&h)[0]["status"] == "expired").then_some(()),
    );
    // Still good, for the name-taken case.
    let (_, _, fresh) = invite(&h, &["--uses", "2"]);
    let script = format!(
        "{REGISTER}{}",
        r#"
import re

def preauth(token):
    """The server's answer to a preauth iq on a fresh stream, without its id."""
    s = raw_stream()
    s.sendall(f"<iq type='set' id='x'><preauth xmlns='urn:xmpp:pars:0' token='{token}'/></iq>".encode())
    # An error ends with </iq>; a result is one empty element.
    r = read_until(s, b"</iq>", b"result' id='x'/>", b'result" id="x"/>')
    s.close()
    return r.decode()

async def main():
    carol = Newcomer("carol", "carol's passphrase", os.environ["USED"])
    await carol.online()
    answers = {name: preauth(os.environ[name]) for name in ("USED", "REVOKED", "EXPIRED")}
    answers["UNKNOWN"] = preauth("A" * 22)
    assert "item-not-found" in answers["UNKNOWN"], answers
    for name, a in answers.items():
        assert a == answers["UNKNOWN"], (name, a, answers["UNKNOWN"])
    # A good token answers with a result.
    assert "type='result'" in preauth(os.environ["FRESH"]) or 'type="result"' in preauth(os.environ["FRESH"])
    # Registering without a token is refused.
    s = raw_stream()
    s.sendall(b"<iq type='set' id='r'><query xmlns='jabber:iq:register'><username>mallory</username><password>a long password</password></query></iq>")
    r = read_until(s, b"</iq>").decode()
    assert "not-allowed" in r, r
    s.close()
    # A taken name: conflict, and the invite is not spent.
    taken = Newcomer("alice", "another passphrase", os.environ["FRESH"])
    try:
        await taken.online(timeout=20)
        raise AssertionError("registered a taken name")
    except RuntimeError as e:
        assert str(e) == "conflict", e
    # A bad token through slixmpp: the registration fails, no account.
    late = Newcomer("dave", "dave's passphrase", os.environ["EXPIRED"])
    try:
        await late.online(timeout=20)
        raise AssertionError("registered with an expired token")
    except RuntimeError as e:
        assert str(e) == "item-not-found", e

run(main)
"#
    );
    check(
        &h,
        &script,
        &[
            ("USED", used.clone()),
            ("REVOKED", revoked.clone()),
            ("EXPIRED", expired.clone()),
            ("FRESH", fresh.clone()),
        ],
    );
    // The landing page, too, is one and the same for all of them.
    let unknown = page(&h, &"C".repeat(22));
    assert!(unknown.ends_with("\n404"), "{unknown}");
    for token in [&used, &revoked, &expired] {
        assert_eq!(page(&h, token), unknown);
    }
    assert!(page(&h, &fresh).ends_with("\n200"));
    let list = invites_json(&h);
    let statuses: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    // Newest first: fresh (unspent), expired, revoked, used.
    assert_eq!(statuses, ["valid", "expired", "revoked", "used"]);
    assert_eq!(list[0]["uses"], 0);
    let users = h.daemon.granary(&["user", "list"]).success().stdout;
    assert!(users.contains("carol"), "{users}");
    assert!(
        !users.contains("dave") && !users.contains("mallory"),
        "{users}"
    );
}

/// The landing page in a real browser, at phone and desktop sizes.
const BROWSER: &str = r#"
import base64, json, os, subprocess, tempfile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

art = os.environ["ARTIFACTS"]
os.makedirs(art, exist_ok=True)
spki = subprocess.run(
    "openssl x509 -in \"$XMPP_CA\" -pubkey -noout | openssl pkey -pubin -outform der "
    "| openssl dgst -sha256 -binary | base64", shell=True, check=True,
    capture_output=True, text=True).stdout.strip()
profile = tempfile.mkdtemp()
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          f"--user-data-dir={profile}", "--host-resolver-rules=MAP chat.test 127.0.0.1",
          # Trust the test's local CA, and nothing else.
          f"--ignore-certificate-errors-spki-list={spki}"):
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)

def luminance(rgb):
    def c(v):
        v = v / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    r, g, b = rgb
    return 0.2126 * c(r) + 0.7152 * c(g) + 0.0722 * c(b)

def rgb(css):
    inner = css[css.index("(") + 1:css.index(")")]
    return tuple(int(float(x)) for x in inner.split(",")[:3])

def contrast(el, background=None):
    fg = rgb(el.value_of_css_property("color"))
    bg = rgb(background or el.value_of_css_property("background-color"))
    if "rgba(0, 0, 0, 0)" == (background or el.value_of_css_property("background-color")):
        bg = (255, 255, 255)
    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)

def decode(el, name):
    path = os.path.join(art, name)
    el.screenshot(path)
    out = subprocess.run(["zbarimg", "--quiet", "--raw", path], capture_output=True, text=True)
    assert out.returncode == 0, (name, out.stderr)
    return out.stdout.strip()

try:
    for size, (w, h) in (("phone", (390, 844)), ("desktop", (1280, 900))):
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": w, "height": h, "deviceScaleFactor": 1, "mobile": size == "phone"})
        driver.get(os.environ["LINK"])
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
        h1 = driver.find_element(By.TAG_NAME, "h1").text
        assert h1 == "alice@chat.test invites you to chat", h1
        body = driver.find_element(By.TAG_NAME, "body").text
        for words in ("Install a chat app", "Open the invite in the app",
                      "Conversations", "Monal", "Gajim", "Dino",
                      "you choose a name and a password",
                      "alice@chat.test is then in your contacts"):
            assert words in body, (size, words, body)
        links = {a.text: a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")}
        assert links["Open the invite in your chat app"] == os.environ["URI"], links
        assert links["Conversations on F-Droid"].startswith("https://f-droid.org/packages/eu.siacs.conversations"), links
        assert links["Monal on the App Store"].startswith("https://apps.apple.com/"), links
        assert links["Dino"].startswith("https://dino.im"), links
        # Fits the screen: nothing scrolls sideways.
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= w, (size, width)
        # No script at all (the page works without JavaScript).
        assert driver.find_elements(By.TAG_NAME, "script") == []
        # Readable: text and the button meet WCAG AA contrast.
        assert contrast(driver.find_element(By.TAG_NAME, "p"), "rgb(255, 255, 255)") >= 4.5
        button = driver.find_element(By.CLASS_NAME, "button")
        assert contrast(button) >= 4.5, contrast(button)
        codes = driver.find_elements(By.CSS_SELECTOR, "svg.qr")
        assert len(codes) == 2
        for c in codes:
            assert c.get_attribute("role") == "img" and c.get_attribute("aria-label"), c.get_attribute("outerHTML")[:200]
        driver.execute_script("arguments[0].scrollIntoView()", codes[0])
        assert decode(codes[0], f"invite-app-qr-{size}.png") == os.environ["URI"]
        driver.execute_script("arguments[0].scrollIntoView()", codes[1])
        assert decode(codes[1], f"invite-page-qr-{size}.png") == os.environ["LINK"]
        driver.execute_script("window.scrollTo(0, 0)")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "format": "png"})
        with open(os.path.join(art, f"invite-{size}.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))
    # A link that is not valid: the same page whatever the reason.
    driver.get(os.environ["BAD_LINK"])
    assert driver.find_element(By.TAG_NAME, "h1").text == "This invite link is not valid"
    driver.save_screenshot(os.path.join(art, "invite-not-valid.png"))
finally:
    driver.quit()
print("ok")
"#;

#[test]
fn the_landing_page_in_a_browser() {
    let h = host(&["alice"]);
    let (link, uri, token) = invite(&h, &["--for", "alice"]);
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("../test-artifacts/invite")
        .display()
        .to_string();
    let mut bad = link.clone();
    bad.truncate(link.len() - token.len());
    bad.push_str(&"B".repeat(22));
    check(
        &h,
        BROWSER,
        &[
            ("LINK", link.clone()),
            ("URI", uri),
            ("BAD_LINK", bad.clone()),
            ("ARTIFACTS", artifacts.clone()),
        ],
    );
    eprintln!("screenshots: {artifacts}");
    // A link that stopped working reads like one that never did (the
    // other kinds: `bad_tokens_all_fail_alike_and_spend_nothing`).
    let unknown = page(&h, &"B".repeat(22));
    assert!(unknown.ends_with("\n404"), "{unknown}");
    assert!(page(&h, &token).ends_with("\n200"));
    let id = invites_json(&h)[0]["id"].as_i64().unwrap();
    h.daemon
        .granary(&["invite", "revoke", &id.to_string()])
        .success();
    assert_eq!(page(&h, &token), unknown);
}

#[test]
fn an_existing_user_takes_a_contact_invite_by_pre_authenticated_subscription() {
    let h = host(&["alice", "bob", "carol"]);
    let (_, uri, token) = invite(&h, &["--for", "alice"]);
    assert!(uri.starts_with("xmpp:alice@chat.test?roster;"), "{uri}");
    check(
        &h,
        r#"
from granary_xmpp_test import *

async def main():
    alice = await Client("alice", "laptop").online()
    # Alice's app asks her before approving anyone (slixmpp approves by
    # default).
    alice.roster.auto_authorize = None
    alice.roster.auto_subscribe = False
    bob = await Client("bob", "phone").online()
    carol = await Client("carol", "phone").online()
    # Carol's request with a made-up token is an ordinary request: Alice
    # is asked, nothing is approved for her.
    carol.send_raw("<presence type='subscribe' to='alice@chat.test'>"
                   "<preauth xmlns='urn:xmpp:pars:0' token='" + "D" * 22 + "'/></presence>")
    asked = await next_of(alice.requests, lambda p: p["from"].bare == "carol@chat.test")
    # What Bob's app sends for xmpp:alice@chat.test?roster;preauth=TOKEN
    # (XEP-0379): no approval needed from Alice.
    bob.send_raw("<presence type='subscribe' to='alice@chat.test'>"
                 f"<preauth xmlns='urn:xmpp:pars:0' token='{os.environ['TOKEN']}'/></presence>")
    await next_of(alice.presences, lambda p: p["from"].bare == "bob@chat.test")
    await next_of(bob.presences, lambda p: p["from"].bare == "alice@chat.test")
    await alice.get_roster()
    await bob.get_roster()
    assert alice.client_roster["bob@chat.test"]["subscription"] == "both", alice.client_roster
    assert bob.client_roster["alice@chat.test"]["subscription"] == "both", bob.client_roster
    assert alice.client_roster["carol@chat.test"]["subscription"] == "none", alice.client_roster
    for c in (alice, bob, carol):
        c.disconnect()

run(main)
"#,
        &[("TOKEN", token)],
    );
    let it = &invites_json(&h)[0];
    assert_eq!(it["used_by"], serde_json::json!(["bob"]));
    assert_eq!(it["status"], "used");
}
