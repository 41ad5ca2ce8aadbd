-- SCRAM verifiers (RFC 5802/7677) of an app password whose protocol needs
-- them (kind xmpp): one per line, `MECH$iterations$salt$StoredKey$ServerKey`
-- in base64; never the password. Empty for every other kind.
ALTER TABLE app_passwords ADD COLUMN scram TEXT NOT NULL DEFAULT '';
