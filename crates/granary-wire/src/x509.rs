//! When a certificate stops being valid: its `notAfter`, read from the DER
//! by walking just enough of RFC 5280's structure (Certificate → TBS →
//! validity). For the doctor and `/metrics`; certificates are checked by
//! rustls, never by this. Pure, fuzzed (`fuzz/fuzz_targets/x509_not_after.rs`).

/// One DER element: (tag, contents, what follows it).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The certificate's `notAfter` as Unix seconds; `None` when the bytes
/// are not a certificate this walk understands.
pub fn not_after(der: &[u8]) -> Option<i64> {
    validity(der).map(|(_, not_after)| not_after)
}

/// The certificate's `notBefore` and `notAfter` as Unix seconds (ACME
/// renews at two thirds of the span between them).
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    const SEQUENCE: u8 = 0x30;
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // [0] version (optional), serial, signature algorithm, issuer.
    let mut seen = 0;
    loop {
        let (tag, _, rest) = element(tbs)?;
        tbs = rest;
        if tag == 0xa0 {
            continue;
        }
        seen += 1;
        if seen == 3 {
            break;
        }
    }
    let (tag, validity, _) = element(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, before, rest) = element(validity)?;
    let not_before = time(tag, before)?;
    let (tag, after, _) = element(rest)?;
    Some((not_before, time(tag, after)?))
}

fn time(tag: u8, bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    match tag {
        0x17 => utc_time(text),
        0x18 => generalized_time(text),
        _ => None,
    }
}

/// `YYMMDDHHMMSSZ` (RFC 5280: years 50–99 are 19xx).
fn utc_time(t: &str) -> Option<i64> {
    if t.len() != 13 || !t.is_ascii() || !t.ends_with('Z') {
        return None;
    }
    let yy: i64 = num(&t[0..2])?;
    let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
    unix(year, &t[2..12])
}

/// `YYYYMMDDHHMMSSZ`.
fn generalized_time(t: &str) -> Option<i64> {
    if t.len() != 15 || !t.is_ascii() || !t.ends_with('Z') {
        return None;
    }
    unix(num(&t[0..4])?, &t[4..14])
}

fn num(s: &str) -> Option<i64> {
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `MMDDHHMMSS` of `year` as Unix seconds (days from civil, H. Hinnant).
fn unix(year: i64, rest: &str) -> Option<i64> {
    let (m, d, h, min, s) = (
        num(&rest[0..2])?,
        num(&rest[2..4])?,
        num(&rest[4..6])?,
        num(&rest[6..8])?,
        num(&rest[8..10])?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert() {
        assert_eq!(utc_time("700101000000Z"), Some(0));
        assert_eq!(utc_time("090213233130Z"), Some(1_234_567_890));
        assert_eq!(generalized_time("20380119031408Z"), Some(2_147_483_648));
        assert_eq!(utc_time("0902132331Z"), None);
        assert_eq!(utc_time("09021323313aZ"), None);
    }

    #[test]
    fn a_real_certificate_is_read() {
        let mut params = rcgen::CertificateParams::new(vec!["example.org".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2009, 2, 13);
        params.not_after = rcgen::date_time_ymd(2031, 5, 6);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // 2031-05-06T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(1_935_792_000));
        // 2009-02-13T00:00:00Z
        assert_eq!(validity(cert.der()), Some((1_234_483_200, 1_935_792_000)));
        assert_eq!(not_after(&cert.der()[..40]), None);
        assert_eq!(not_after(b""), None);
        // Every prefix and every single-byte change: an answer or None,
        // never a panic.
        let der = cert.der().to_vec();
        for i in 0..der.len() {
            let _ = not_after(&der[..i]);
            for v in [0x00, 0x17, 0x18, 0x30, 0x84, 0xff, b'Z', 0xc3] {
                let mut bent = der.clone();
                bent[i] = v;
                let _ = not_after(&bent);
            }
        }
        assert_eq!(utc_time("0902132331\u{e9}Z"), None);
    }
}
