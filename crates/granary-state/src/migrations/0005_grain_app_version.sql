-- The app version each grain's data was last migrated to: a grain whose app
-- changed runs the app's migration hook before it starts.
ALTER TABLE grains ADD COLUMN app_version TEXT NOT NULL DEFAULT '';
