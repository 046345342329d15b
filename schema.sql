-- Engram's schema: the single source, applied idempotently at every start-up.
-- Every statement must be safe to run again on a database that already has it.

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- Facts about the deployment itself, such as which embedding model made the
-- stored vectors (vectors of two models must never be mixed).
CREATE TABLE IF NOT EXISTS engram_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- retrieval_threshold defaults to 0: the closest memories are injected whatever
-- their score, because a useful memory is often only loosely similar to the
-- question ("suggest a dinner place" vs "the user is vegetarian": cosine ~0.1).
-- Raise it per user to inject only close matches.
CREATE TABLE IF NOT EXISTS users (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email                 text NOT NULL,
    max_memories_injected integer NOT NULL DEFAULT 5
        CHECK (max_memories_injected BETWEEN 0 AND 50),
    retrieval_threshold   real NOT NULL DEFAULT 0.0
        CHECK (retrieval_threshold BETWEEN 0 AND 1),
    dedup_threshold       real NOT NULL DEFAULT 0.9
        CHECK (dedup_threshold BETWEEN 0.5 AND 1),
    created_at            timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email_key ON users (lower(email));

-- Only an argon2id hash of a key's secret is kept; key_id is the public part
-- of `egm_<key_id>_<secret>` and is how a key is found.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id       text PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT 'default',
    secret_hash  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX IF NOT EXISTS api_keys_user_id ON api_keys (user_id);

CREATE TABLE IF NOT EXISTS conversations (
    id                uuid PRIMARY KEY,
    user_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    provider          text NOT NULL,
    model             text NOT NULL,
    messages          jsonb NOT NULL,
    reply             jsonb,
    status_code       integer NOT NULL,
    extraction_status text NOT NULL DEFAULT 'pending'
        CHECK (extraction_status IN ('pending', 'done', 'skipped', 'failed')),
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversations_user_created
    ON conversations (user_id, created_at DESC);

CREATE TABLE IF NOT EXISTS memories (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    content                text NOT NULL,
    content_hash           text NOT NULL,
    embedding              vector(384) NOT NULL,
    kind                   text NOT NULL DEFAULT 'other'
        CHECK (kind IN ('preference', 'fact', 'decision', 'plan', 'other')),
    confidence             real NOT NULL DEFAULT 1.0 CHECK (confidence BETWEEN 0 AND 1),
    metadata               jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at            timestamptz,
    access_count           integer NOT NULL DEFAULT 0,
    last_accessed_at       timestamptz,
    source_conversation_id uuid REFERENCES conversations (id) ON DELETE SET NULL,
    superseded_by          uuid REFERENCES memories (id) ON DELETE SET NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, content_hash)
);
-- Per-user search is exact, from memories_user_half_vectors (scripts/BENCHMARKS.md section 3).
DROP INDEX IF EXISTS memories_embedding_hnsw;
-- A user's active rows by key alone, a hundredth the size of memories_user_half_vectors,
-- for plans that need only which rows they are. (Hybrid search counted them here
-- until it took the count from memory_word_counts.)
CREATE INDEX IF NOT EXISTS memories_active_user
    ON memories (user_id) WHERE superseded_by IS NULL;
-- Each embedding again in half precision (2 bytes a number, not 4): per-user
-- vector search scans these for its nearest few, then ranks those by the
-- embeddings themselves. Scanning half the bytes halved the scan of a user with
-- 10,000 memories (6.8 → 3.2 ms; scripts/BENCHMARKS.md, experiments).
ALTER TABLE memories ADD COLUMN IF NOT EXISTS embedding_half halfvec(384)
    GENERATED ALWAYS AS (embedding::halfvec(384)) STORED;
-- Per-user vector search reads a user's vectors from here, not from the table:
-- the rows of a user who wrote over months are scattered one per heap page,
-- while their index entries sit together, several per page (an index-only scan).
CREATE INDEX IF NOT EXISTS memories_user_half_vectors
    ON memories (user_id) INCLUDE (id, embedding_half) WHERE superseded_by IS NULL;
-- The same with the full-precision embeddings, before embedding_half.
DROP INDEX IF EXISTS memories_user_vectors;
-- Index-only scans skip the table only on pages the visibility map marks
-- all-visible, and vacuum sets the marks. Vacuum once 2 % of the rows are new or
-- changed instead of PostgreSQL's 20 %, so new memories and the ones retrieval
-- just counted stop costing a table read soon (a stale map doubled search time).
ALTER TABLE memories SET (autovacuum_vacuum_insert_scale_factor = 0.02,
                          autovacuum_vacuum_scale_factor = 0.02);
-- A memory of a few sentences, its 1.5 KB embedding and its words pass the
-- 2 KB at which PostgreSQL moves a row's largest value out of line: then every
-- search that reads rows from the table (a user owning most of it gets a
-- sequential scan) fetched each embedding from TOAST, the planner not counting
-- it (1,000 LoCoMo turns of one user: hybrid search 4.2 → 3.3 ms, 2,760: 7.5 →
-- 4.7 ms, with rows of up to 4 KB kept whole). Rows written before stay as
-- they are until the table is rewritten (VACUUM FULL).
ALTER TABLE memories SET (toast_tuple_target = 4080);
-- Words, for the lexical half of hybrid search (rare names and terms that a
-- small embedding model blurs).
ALTER TABLE memories ADD COLUMN IF NOT EXISTS content_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('english', content)) STORED;
-- A user's memories holding a word, found by one key per (user, word): the
-- posting list of a key is that user's memories with that word and nothing else.
-- A GIN on the words alone (the previous memories_content_tsv) kept one list per
-- word over all users: a common word's list spans much of the table, and the
-- search intersected it with all of the user's rows (or, in the generic plan,
-- read all of the user's rows to test their words: 43 ms for a user with 10,000
-- memories at a million rows; scripts/BENCHMARKS.md, experiments).
CREATE OR REPLACE FUNCTION memory_words(owner uuid, words tsvector) RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ARRAY(SELECT owner::text || ' ' || word FROM unnest(tsvector_to_array(words)) word);
-- A query matching exactly one lexeme, as hybrid search tests each of its words
-- against a memory's. Quoted, not parsed: to_tsquery would split a lexeme such
-- as 'running-sho' (from "running-shoes") into a phrase that no memory holds.
CREATE OR REPLACE FUNCTION lexeme_query(lexeme text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ('''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''')::tsquery;
DROP INDEX IF EXISTS memories_content_tsv;
-- Without the fast-update pending list: with it, new entries wait in one
-- unsorted list, shared by all users, that every word search reads through
-- until vacuum merges it (up to gin_pending_list_limit, 4 MB); that list was
-- most of the lexical half's time in scripts/bench_overhead. Memories are
-- written in the background and searched before every answer, so the insert
-- pays instead.
CREATE INDEX IF NOT EXISTS memories_user_words
    ON memories USING gin (memory_words(user_id, content_tsv)) WITH (fastupdate = off)
    WHERE superseded_by IS NULL;
-- A memory's neighbours in capture order, which hybrid search credits with
-- the words of the memory beside them (a conversation's turns).
CREATE INDEX IF NOT EXISTS memories_active_user_created
    ON memories (user_id, created_at, id) WHERE superseded_by IS NULL;
-- Deleting a memory or a conversation looks up the rows that point at it (ON
-- DELETE SET NULL); without these, one full scan of memories per deleted row.
CREATE INDEX IF NOT EXISTS memories_superseded_by
    ON memories (superseded_by) WHERE superseded_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS memories_source_conversation
    ON memories (source_conversation_id) WHERE source_conversation_id IS NOT NULL;

-- How many of a user's active memories hold each word; the row whose word is ''
-- counts them all. Hybrid search weighs a query word by its count, and reads
-- the memories holding it only while that count is small (proxy/db/memories.py):
-- counting them through memories_user_words reads each one from the table.
-- Kept by the triggers below, whatever writes memories.
CREATE TABLE IF NOT EXISTS memory_word_counts (
    user_id uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    word    text    NOT NULL,
    holders integer NOT NULL,
    PRIMARY KEY (user_id, word)
);
-- Adds each memory's delta (1 entering the active set, -1 leaving it) to the
-- counts of its words and of ''.
CREATE OR REPLACE FUNCTION shift_memory_word_counts(owners uuid[], words tsvector[], deltas integer[])
    RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    -- A deleted user's memories leave with it, and so do its counts. Looked up
    -- once: tested per word, or joined, it cost a capture 0.1-0.2 ms more.
    alive uuid[] := ARRAY(SELECT id FROM users WHERE id = ANY (owners));
    gone_owners uuid[];
    gone_words text[];
BEGIN
    WITH shifted AS (
        INSERT INTO memory_word_counts AS counts (user_id, word, holders)
        SELECT owner, word, sum(delta)::integer
        FROM unnest(owners, words, deltas) AS changed(owner, words, delta),
             unnest(array_append(tsvector_to_array(changed.words), '')) AS word
        WHERE changed.owner = ANY (alive)
        GROUP BY owner, word
        HAVING sum(delta) <> 0
        -- One lock order for every writer, so two of them cannot deadlock.
        ORDER BY owner, word
        ON CONFLICT (user_id, word) DO UPDATE SET holders = counts.holders + excluded.holders
        RETURNING counts.user_id, counts.word, counts.holders
    )
    SELECT array_agg(user_id), array_agg(word) INTO gone_owners, gone_words
    FROM shifted WHERE holders <= 0;
    IF gone_owners IS NOT NULL THEN
        DELETE FROM memory_word_counts counts
        USING unnest(gone_owners, gone_words) AS gone(owner, word)
        WHERE counts.user_id = gone.owner AND counts.word = gone.word AND counts.holders <= 0;
    END IF;
END $$;
CREATE OR REPLACE FUNCTION count_inserted_memory_words() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shift_memory_word_counts(array_agg(user_id), array_agg(content_tsv), array_agg(1))
    FROM inserted WHERE superseded_by IS NULL;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION count_deleted_memory_words() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shift_memory_word_counts(array_agg(user_id), array_agg(content_tsv), array_agg(-1))
    FROM deleted WHERE superseded_by IS NULL;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION count_updated_memory_words() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM shift_memory_word_counts(
        ARRAY[OLD.user_id, NEW.user_id], ARRAY[OLD.content_tsv, NEW.content_tsv],
        ARRAY[CASE WHEN OLD.superseded_by IS NULL THEN -1 ELSE 0 END,
              CASE WHEN NEW.superseded_by IS NULL THEN 1 ELSE 0 END]);
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION forget_memory_word_counts() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE memory_word_counts;
    RETURN NULL;
END $$;
-- Per statement for inserts and deletes (a COPY of 20,000 memories is one call);
-- per row for updates, and only for those that change the words or the active
-- set: every answer updates its memories' access counts.
CREATE OR REPLACE TRIGGER memories_count_inserted_words
    AFTER INSERT ON memories REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION count_inserted_memory_words();
CREATE OR REPLACE TRIGGER memories_count_deleted_words
    AFTER DELETE ON memories REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION count_deleted_memory_words();
CREATE OR REPLACE TRIGGER memories_count_updated_words
    AFTER UPDATE OF content, superseded_by ON memories FOR EACH ROW
    WHEN (OLD.content_tsv IS DISTINCT FROM NEW.content_tsv
          OR OLD.superseded_by IS DISTINCT FROM NEW.superseded_by)
    EXECUTE FUNCTION count_updated_memory_words();
CREATE OR REPLACE TRIGGER memories_forget_word_counts
    AFTER TRUNCATE ON memories
    FOR EACH STATEMENT EXECUTE FUNCTION forget_memory_word_counts();
-- Counts for the memories written before the table existed. The triggers above
-- hold a lock on memories that keeps writers out until this transaction ends.
INSERT INTO memory_word_counts (user_id, word, holders)
SELECT user_id, word, count(*)
FROM memories, unnest(array_append(tsvector_to_array(content_tsv), '')) AS word
WHERE superseded_by IS NULL AND NOT EXISTS (SELECT FROM memory_word_counts)
GROUP BY user_id, word;

-- Why did the model say that? One row per proxied call: what was asked, which
-- memories were found with which scores, and where the time went.
CREATE TABLE IF NOT EXISTS retrieval_logs (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id uuid REFERENCES conversations (id) ON DELETE CASCADE,
    query_text      text NOT NULL,
    query_embedding vector(384),
    memory_ids      uuid[] NOT NULL DEFAULT '{}',
    scores          real[] NOT NULL DEFAULT '{}',
    timings         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS retrieval_logs_user_created
    ON retrieval_logs (user_id, created_at DESC, id DESC);
-- For the cascade from a deleted conversation (see memories_superseded_by).
CREATE INDEX IF NOT EXISTS retrieval_logs_conversation
    ON retrieval_logs (conversation_id) WHERE conversation_id IS NOT NULL;

-- The extraction queue: one job per conversation whose exchange may hold
-- memories. Claimed with FOR UPDATE SKIP LOCKED under a renewable lease.
--   pending → running → done | failed;  waiting = the request's provider key
--   is gone (held in memory only) and no server-side extraction model is set.
CREATE TABLE IF NOT EXISTS memory_jobs (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id            uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id    uuid NOT NULL UNIQUE REFERENCES conversations (id) ON DELETE CASCADE,
    status             text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'waiting', 'done', 'failed')),
    attempts           integer NOT NULL DEFAULT 0,
    run_after          timestamptz NOT NULL DEFAULT now(),
    lease_expires_at   timestamptz,
    worker_id          text,
    -- The process whose memory holds the request's provider key, if any.
    credentials_holder text,
    last_error         text,
    raw_output         text,
    memories_stored    integer NOT NULL DEFAULT 0,
    memories_merged    integer NOT NULL DEFAULT 0,
    memories_rejected  integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
CREATE INDEX IF NOT EXISTS memory_jobs_claimable
    ON memory_jobs (run_after) WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS memory_jobs_user_status ON memory_jobs (user_id, status);
