//! The user's own statistical junk filter (as in mox): trained by what the
//! user moves into Junk (spam) and out of it to anywhere but Trash (ham),
//! it files new mail by its verdict. Robinson's per-word estimate with
//! Fisher's combination of the most telling words; it stays silent until
//! it has seen enough of both kinds.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::StoreError;

/// What the user said a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ham = 1,
    Spam = 2,
}

/// Messages of each kind needed before the filter files anything.
const MIN_TRAINED: i64 = 5;
/// Words that decide a verdict.
const TELLING: usize = 15;
/// Spam above this probability.
const THRESHOLD: f64 = 0.95;

fn counter(db: &Connection, name: &str) -> Result<i64, StoreError> {
    Ok(
        db.query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
            r.get(0)
        })?,
    )
}

/// Whether the filter calls a message with these words spam.
pub fn is_spam(db: &Connection, tokens: &[String]) -> Result<bool, StoreError> {
    Ok(spam_probability(db, tokens)?.is_some_and(|p| p > THRESHOLD))
}

/// The probability that these words are spam; `None` before the filter
/// has been trained enough.
pub fn spam_probability(db: &Connection, tokens: &[String]) -> Result<Option<f64>, StoreError> {
    let nham = counter(db, "junk_ham")?;
    let nspam = counter(db, "junk_spam")?;
    if nham < MIN_TRAINED || nspam < MIN_TRAINED {
        return Ok(None);
    }
    let mut stmt = db.prepare_cached("SELECT ham, spam FROM junk_tokens WHERE token = ?1")?;
    let mut estimates: Vec<f64> = Vec::new();
    for t in tokens {
        let Some((ham, spam)) = stmt
            .query_row([t], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .optional()?
        else {
            continue;
        };
        let n = (ham + spam) as f64;
        if n == 0.0 {
            continue;
        }
        let hp = ham as f64 / nham as f64;
        let sp = spam as f64 / nspam as f64;
        let p = sp / (hp + sp);
        // Robinson: pull rarely seen words towards 0.5 (strength 1).
        let f = (0.5 + n * p) / (1.0 + n);
        estimates.push(f.clamp(0.01, 0.99));
    }
    if estimates.is_empty() {
        return Ok(Some(0.5));
    }
    estimates.sort_by(|a, b| (b - 0.5).abs().total_cmp(&(a - 0.5).abs()));
    estimates.truncate(TELLING);
    // Fisher: combine with the chi-square distribution, both ways.
    let n = estimates.len();
    let h = chi2q(-2.0 * estimates.iter().map(|f| f.ln()).sum::<f64>(), 2 * n);
    let s = chi2q(
        -2.0 * estimates.iter().map(|f| (1.0 - f).ln()).sum::<f64>(),
        2 * n,
    );
    Ok(Some((1.0 + h - s) / 2.0))
}

/// The chi-square survival function for even degrees of freedom.
fn chi2q(x2: f64, v: usize) -> f64 {
    let m = x2 / 2.0;
    let mut term = (-m).exp();
    let mut sum = term;
    for i in 1..v / 2 {
        term *= m / i as f64;
        sum += term;
    }
    sum.min(1.0)
}

/// Learns from the user's verdict on `blob`; undoes an earlier opposite
/// verdict on the same message first. Nothing happens when the message
/// was already trained this way.
pub fn train(
    db: &Connection,
    blob: i64,
    tokens: &[String],
    verdict: Verdict,
) -> Result<(), StoreError> {
    let before: i64 = db.query_row("SELECT trained FROM blobs WHERE id = ?1", [blob], |r| {
        r.get(0)
    })?;
    if before == verdict as i64 {
        return Ok(());
    }
    let column = |v: i64| {
        if v == Verdict::Spam as i64 {
            "spam"
        } else {
            "ham"
        }
    };
    if before != 0 {
        let col = column(before);
        for t in tokens {
            db.execute(
                &format!("UPDATE junk_tokens SET {col} = max({col} - 1, 0) WHERE token = ?1"),
                [t],
            )?;
        }
        db.execute(
            &format!("UPDATE counters SET value = max(value - 1, 0) WHERE name = 'junk_{col}'"),
            [],
        )?;
    }
    let col = column(verdict as i64);
    for t in tokens {
        db.execute(
            &format!(
                "INSERT INTO junk_tokens (token, {col}) VALUES (?1, 1)
                 ON CONFLICT(token) DO UPDATE SET {col} = {col} + 1"
            ),
            [t],
        )?;
    }
    db.execute(
        &format!("UPDATE counters SET value = value + 1 WHERE name = 'junk_{col}'"),
        [],
    )?;
    db.execute(
        "UPDATE blobs SET trained = ?2 WHERE id = ?1",
        params![blob, verdict as i64],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(include_str!("store/schema.sql")).unwrap();
        c
    }

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn silent_until_trained_then_files_by_the_users_sorting() {
        let db = db();
        assert_eq!(spam_probability(&db, &words("viagra")).unwrap(), None);
        for i in 0..8 {
            db.execute(
                "INSERT INTO blobs (id, size, refs, envelope, bodystructure, body) VALUES (?1, 1, 1, '', '', '')",
                [i],
            )
            .unwrap();
        }
        for i in 0..4 {
            train(
                &db,
                i,
                &words("cheap pills winner casino offer"),
                Verdict::Spam,
            )
            .unwrap();
            train(
                &db,
                i + 4,
                &words("meeting agenda tuesday project notes"),
                Verdict::Ham,
            )
            .unwrap();
        }
        // Not enough yet.
        assert!(!is_spam(&db, &words("cheap pills")).unwrap());
        for i in 8..12 {
            db.execute(
                "INSERT INTO blobs (id, size, refs, envelope, bodystructure, body) VALUES (?1, 1, 1, '', '', '')",
                [i],
            )
            .unwrap();
            let v = if i % 2 == 0 {
                Verdict::Spam
            } else {
                Verdict::Ham
            };
            let w = if i % 2 == 0 {
                "casino winner offer"
            } else {
                "project tuesday agenda"
            };
            train(&db, i, &words(w), v).unwrap();
        }
        assert!(is_spam(&db, &words("cheap casino winner pills")).unwrap());
        assert!(!is_spam(&db, &words("project agenda for tuesday")).unwrap());
        // Training the same message twice the same way changes nothing;
        // the other way undoes the first.
        let before = spam_probability(&db, &words("casino")).unwrap();
        train(
            &db,
            0,
            &words("cheap pills winner casino offer"),
            Verdict::Spam,
        )
        .unwrap();
        assert_eq!(spam_probability(&db, &words("casino")).unwrap(), before);
        train(
            &db,
            0,
            &words("cheap pills winner casino offer"),
            Verdict::Ham,
        )
        .unwrap();
        assert!(spam_probability(&db, &words("casino")).unwrap() < before);
    }
}
