-- A grain's quota as the admin set it (`granary grain quota`): NULL for
-- storage.quota_mib, 0 for none, else bytes. Kept with the grain so every
-- node applies it to whatever dataset of the grain it makes.
ALTER TABLE grains ADD COLUMN quota_bytes INTEGER;
