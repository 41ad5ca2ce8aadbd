-- A cluster node's place in the shared log (see shared.rs): which log
-- (the cluster's id; '' until the node first read one) and the sequence
-- number of the last entry applied to this database. 0 on a node that
-- never joined a cluster, or one that has not read the log yet.
CREATE TABLE shared_log (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    log     TEXT    NOT NULL DEFAULT '',
    applied INTEGER NOT NULL
) STRICT;
INSERT INTO shared_log (id, applied) VALUES (1, 0);
