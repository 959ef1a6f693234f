-- mqtt-persist schema for PostgreSQL.
-- Times are milliseconds since the Unix epoch (BIGINT), the same on every backend; use
-- to_timestamp(online_at / 1000.0) to read them as timestamptz. Payloads are BYTEA, verbatim.
-- msgids are 64-bit, time-ordered: ms clock | node id | sequence (see SPEC §2).

CREATE TABLE IF NOT EXISTS mqtt_client (
  id         BIGSERIAL PRIMARY KEY,
  clientid   TEXT NOT NULL UNIQUE,
  state      SMALLINT NOT NULL DEFAULT 0,
  node       TEXT,
  online_at  BIGINT,
  offline_at BIGINT,
  created    BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT
);

-- Written by your application: the topics a client is subscribed to on connect
-- (on_subscribe_lookup).
CREATE TABLE IF NOT EXISTS mqtt_sub (
  id       BIGSERIAL PRIMARY KEY,
  clientid TEXT NOT NULL,
  topic    TEXT NOT NULL,
  qos      SMALLINT NOT NULL DEFAULT 1,
  created  BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT,
  UNIQUE (clientid, topic)
);

CREATE TABLE IF NOT EXISTS mqtt_msg (
  id      BIGSERIAL PRIMARY KEY,
  msgid   BIGINT NOT NULL UNIQUE,
  sender  TEXT NOT NULL,
  topic   TEXT NOT NULL,
  qos     SMALLINT NOT NULL,
  retain  BOOLEAN NOT NULL DEFAULT false,
  payload BYTEA,
  arrived BIGINT NOT NULL,
  -- MQTT 5 properties as JSON (user properties, content type, expiry, ...); NULL: none
  props   TEXT
);
-- "topic = t AND msgid > p" and "topic LIKE 'prefix/%'" (wildcard fetch) are index scans;
-- text_pattern_ops makes LIKE prefixes indexable whatever the database collation.
CREATE INDEX IF NOT EXISTS mqtt_msg_topic_msgid ON mqtt_msg (topic text_pattern_ops, msgid);
CREATE INDEX IF NOT EXISTS mqtt_msg_arrived ON mqtt_msg (arrived);

CREATE TABLE IF NOT EXISTS mqtt_retain (
  id      BIGSERIAL PRIMARY KEY,
  topic   TEXT NOT NULL UNIQUE,
  msgid   BIGINT NOT NULL,
  sender  TEXT NOT NULL,
  qos     SMALLINT NOT NULL,
  payload BYTEA,
  arrived BIGINT NOT NULL,
  -- MQTT 5 properties as JSON (user properties, content type, expiry, ...); NULL: none
  props   TEXT
);
CREATE INDEX IF NOT EXISTS mqtt_retain_topic_prefix ON mqtt_retain (topic text_pattern_ops);

-- Read pointers: the newest msgid a client has acked per subscription filter.
CREATE TABLE IF NOT EXISTS mqtt_acked (
  id       BIGSERIAL PRIMARY KEY,
  clientid TEXT NOT NULL,
  topic    TEXT NOT NULL,
  mid      BIGINT NOT NULL DEFAULT 0,
  created  BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT,
  UNIQUE (clientid, topic)
);

-- Keep-latest model: only the newest message per topic.
CREATE TABLE IF NOT EXISTS mqtt_latest (
  id      BIGSERIAL PRIMARY KEY,
  topic   TEXT NOT NULL UNIQUE,
  msgid   BIGINT NOT NULL,
  sender  TEXT NOT NULL,
  qos     SMALLINT NOT NULL,
  retain  BOOLEAN NOT NULL DEFAULT false,
  payload BYTEA,
  arrived BIGINT NOT NULL,
  -- MQTT 5 properties as JSON (user properties, content type, expiry, ...); NULL: none
  props   TEXT
);
CREATE INDEX IF NOT EXISTS mqtt_latest_topic_prefix ON mqtt_latest (topic text_pattern_ops);
