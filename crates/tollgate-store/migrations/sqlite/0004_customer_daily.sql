-- One row per UTC day × customer: the sums of usage_daily over keys,
-- routes and models, for the reports that need no finer grain (summary,
-- per day, per customer, top customers, billing). Kept like usage_daily,
-- in the transaction that inserts the rows, for rows actually inserted
-- only. Filled here once from usage_daily so that an existing database
-- starts consistent. SQLite's sum() fails on integer overflow, so each
-- column is summed in halves (as the reports do) and recombined with
-- operators, which turn an overflow into a REAL; clamping that gives back
-- the saturated integer, as the writer saturates.
CREATE TABLE usage_customer_daily (
    day                TEXT    NOT NULL,
    customer_id        TEXT    NOT NULL,
    requests           INTEGER NOT NULL,
    rejected           INTEGER NOT NULL,
    errors             INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    request_bytes      INTEGER NOT NULL,
    response_bytes     INTEGER NOT NULL,
    cost_nanos         INTEGER NOT NULL,
    PRIMARY KEY (day, customer_id)
) WITHOUT ROWID;

CREATE INDEX usage_customer_daily_customer_day ON usage_customer_daily (customer_id, day);

INSERT INTO usage_customer_daily (
    day, customer_id, requests, rejected, errors, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, cost_nanos)
SELECT day, customer_id,
    CAST(MIN(sum(requests >> 32) * 4294967296 + sum(requests & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(rejected >> 32) * 4294967296 + sum(rejected & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(errors >> 32) * 4294967296 + sum(errors & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(input_tokens >> 32) * 4294967296 + sum(input_tokens & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(output_tokens >> 32) * 4294967296 + sum(output_tokens & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(cache_read_tokens >> 32) * 4294967296 + sum(cache_read_tokens & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(cache_write_tokens >> 32) * 4294967296 + sum(cache_write_tokens & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(request_bytes >> 32) * 4294967296 + sum(request_bytes & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MIN(sum(response_bytes >> 32) * 4294967296 + sum(response_bytes & 4294967295), 9223372036854775807) AS INTEGER),
    CAST(MAX(MIN(sum(cost_nanos >> 32) * 4294967296 + sum(cost_nanos & 4294967295), 9223372036854775807),
             -9223372036854775808) AS INTEGER)
FROM usage_daily
GROUP BY day, customer_id;
