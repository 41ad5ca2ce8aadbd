-- A disabled user keeps their data, grains and credentials, but no login
-- of theirs checks out (app passwords, SSH keys, SCRAM, Taskwarrior
-- devices, the web home) until they are enabled again. When, in Unix
-- seconds; NULL while enabled.
ALTER TABLE users ADD COLUMN disabled_at INTEGER;
