-- tank's audit records in ClickHouse: one row per record of either chained log, the line kept
-- byte for byte so the chain verifies from the store (`tank-loader audit verify --clickhouse`).
--
-- A shipper inserts three columns per record (host, log, line; optionally name) as JSONEachRow
-- into ClickHouse's HTTP interface (image/fleet/syslog-ng-tank.conf). Every typed column below
-- is MATERIALIZED from `line` by the server, so no shipper can claim a seq, time or address the
-- line does not hold; they serve search and ordering, and verification reads `line` only.
-- Written for ClickHouse 18.16 (Debian 12's clickhouse-server) and newer: no JSONExtract, no
-- DateTime64, no LowCardinality, which that version lacks.
CREATE DATABASE IF NOT EXISTS tank;

CREATE TABLE IF NOT EXISTS tank.audit
(
    -- Set by the shipper: which chain the line belongs to.
    host String,                           -- the shipping host's name (its shipper config)
    log Enum8('kernel' = 1, 'proxy' = 2),  -- which log the shipper tailed
    name String DEFAULT '',                -- the log's file name on the host ('' : the default)
    line String,                           -- the record's exact line, without its newline

    -- Derived from `line` by the server.
    seq UInt64 MATERIALIZED visitParamExtractUInt(line, 'sequence'),
    time_ms Int64 MATERIALIZED visitParamExtractInt(line, 'time'),
    date Date MATERIALIZED toDate(toDateTime(intDiv(visitParamExtractInt(line, 'time'), 1000))),
    class_uid UInt32 MATERIALIZED toUInt32(visitParamExtractUInt(line, 'class_uid')),
    action String MATERIALIZED visitParamExtractString(line, 'action'),
    -- The TCP connection between agent host and proxy host, as each log names it: the kernel
    -- log's src_endpoint -> dst_endpoint, the proxy log's src_endpoint -> proxy.
    src_ip String MATERIALIZED extract(line, '"src_endpoint":\\{[^}]*"ip":"([^"]*)"'),
    src_port UInt16 MATERIALIZED toUInt16OrZero(extract(line, '"src_endpoint":\\{[^}]*"port":([0-9]+)')),
    dst_ip String MATERIALIZED if(log = 'proxy',
        extract(line, '"proxy":\\{[^}]*"ip":"([^"]*)"'),
        extract(line, '"dst_endpoint":\\{[^}]*"ip":"([^"]*)"')),
    dst_port UInt16 MATERIALIZED toUInt16OrZero(if(log = 'proxy',
        extract(line, '"proxy":\\{[^}]*"port":([0-9]+)'),
        extract(line, '"dst_endpoint":\\{[^}]*"port":([0-9]+)'))),
    -- The proxy log's requested destination (hostname:port), '' in the kernel log.
    target String MATERIALIZED if(log = 'proxy', concat(extract(line, '"dst_endpoint":\\{[^}]*"hostname":"([^"]*)"'), ':', extract(line, '"dst_endpoint":\\{[^}]*"port":([0-9]+)')), ''),
    shipped_at DateTime DEFAULT now()
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(date)
ORDER BY (host, log, name, seq);
