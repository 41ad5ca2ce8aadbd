-- Where an installed app's image lives, relative to DATA_DIR/apps:
-- `<kind>/<version>` for unsigned development installs, `<kind>/<sha256>`
-- for signed packages (content-addressed: the same package gives the same
-- image, and versions coexist).
ALTER TABLE apps ADD COLUMN image TEXT NOT NULL DEFAULT '';
-- The previous image and version, kept for a rollback after an upgrade.
ALTER TABLE apps ADD COLUMN previous_image TEXT NOT NULL DEFAULT '';
ALTER TABLE apps ADD COLUMN previous_version TEXT NOT NULL DEFAULT '';
ALTER TABLE apps ADD COLUMN previous_manifest TEXT NOT NULL DEFAULT '';
