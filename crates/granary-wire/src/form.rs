//! What the web home reads from a browser before anything else: form
//! bodies (`application/x-www-form-urlencoded`) and `Cookie` headers.
//! Pure functions over bytes, fuzzed (`fuzz/fuzz_targets/web_form.rs`).

/// Fields a form may carry at most; the rest are ignored.
pub const MAX_FIELDS: usize = 64;

/// The fields of a urlencoded form body, in order: `+` is a space, `%XX`
/// a byte, invalid UTF-8 replaced. A field without `=` has an empty value.
pub fn fields(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .take(MAX_FIELDS)
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The value of cookie `name` in `Cookie` header values (`a=1; b=2`), the
/// first one sent.
pub fn cookie<'a>(headers: impl IntoIterator<Item = &'a [u8]>, name: &str) -> Option<String> {
    headers
        .into_iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_plus_and_percent() {
        let f = fields(b"user=alice&password=a+b%26c%3D&csrf=&flag&bad=%zz%4");
        assert_eq!(f[0], ("user".into(), "alice".into()));
        assert_eq!(f[1].1, "a b&c=");
        assert_eq!(f[2].1, "");
        assert_eq!(f[3], ("flag".into(), String::new()));
        assert_eq!(f[4].1, "%zz%4");
        assert_eq!(fields(b"%C3%A9=%FF").first().unwrap().0, "é");
        let many = "a=1&".repeat(1000);
        assert_eq!(fields(many.as_bytes()).len(), MAX_FIELDS);
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h: [&[u8]; 2] = [b"a=1; __Host-granary-pre=p", b"__Host-granary=s"];
        assert_eq!(cookie(h, "__Host-granary").as_deref(), Some("s"));
        assert_eq!(cookie(h, "__Host-granary-pre").as_deref(), Some("p"));
        assert_eq!(cookie(h, "x"), None);
    }
}
