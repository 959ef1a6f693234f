-- mqtt-persist schema for SQLite (the embedded default). Created automatically in data/.
-- Times are milliseconds since the Unix epoch (INTEGER). Payloads are BLOBs, stored verbatim.

PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS mqtt_client (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  clientid   TEXT NOT NULL UNIQUE,
  state      INTEGER NOT NULL DEFAULT 0,
  node       TEXT,
  online_at  INTEGER,
  offline_at INTEGER,
  created    INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER) * 1000)
);

-- Written by your application: the topics a client is subscribed to on connect
-- (on_subscribe_lookup).
CREATE TABLE IF NOT EXISTS mqtt_sub (
  id       INTEGER PRIMARY KEY AUTOINCREMENT,
  clientid TEXT NOT NULL,
  topic    TEXT NOT NULL,
  qos      INTEGER NOT NULL DEFAULT 1,
  created  INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER) * 1000),
  UNIQUE (clientid, topic)
);

CREATE TABLE IF NOT EXISTS mqtt_msg (
  id      INTEGER PRIMARY KEY AUTOINCREMENT,
  msgid   INTEGER NOT NULL UNIQUE,
  sender  TEXT NOT NULL,
  topic   TEXT NOT NULL,
  qos     INTEGER NOT NULL,
  retain  INTEGER NOT NULL DEFAULT 0,
  payload BLOB,
  arrived INTEGER NOT NULL,
  -- MQTT 5 properties as JSON (user properties, content type, expiry, ...); NULL: none
  props   TEXT
);
-- Serves "topic = x AND msgid > p" and topic-prefix range scans for wildcard fetches.
CREATE INDEX IF NOT EXISTS mqtt_msg_topic_msgid ON mqtt_msg (topic, msgid);
CREATE INDEX IF NOT EXISTS mqtt_msg_arrived ON mqtt_msg (arrived);

CREATE TABLE IF NOT EXISTS mqtt_retain (
  id      INTEGER PRIMARY KEY AUTOINCREMENT,
  topic   TEXT NOT NULL UNIQUE,
  msgid   INTEGER NOT NULL,
  sender  TEXT NOT NULL,
  qos     INTEGER NOT NULL,
  payload BLOB,
  arrived INTEGER NOT NULL,
  -- MQTT 5 properties as JSON (user properties, content type, expiry, ...); NULL: none
  props   TEXT
);

-- Read pointers: the newest msgid a client has acked per subscription filter.
CREATE TABLE IF NOT EXISTS mqtt_acked (
  id       INTEGER PRIMARY KEY AUTOINCREMENT,
  clientid TEXT NOT NULL,
  topic    TEXT NOT NULL,
  mid      INTEGER NOT NULL DEFAULT 0,
  created  INTEGER NOT NULL DEFAULT (CAST(strftime('%s','now') AS INTEGER) * 1000),
  UNIQUE (clientid, topic)
);

-- Keep-latest model: only the newest message per topic.
CREATE TABLE IF NOT EXISTS mqtt_latest (
  id      INTEGER PRIMARY KEY AUTOINCREMENT,
  topic   TEXT NOT NULL UNIQUE,
  msgid   INTEGER NOT NULL,
  sender  TEXT NOT NULL,
  qos     INTEGER NOT NULL,
  retain  INTEGER NOT NULL DEFAULT 0,
  payload BLOB,
  arrived INTEGER NOT NULL,
  -- MQTT 5 properties as JSON (user properties, content type, expiry, ...); NULL: none
  props   TEXT
);
