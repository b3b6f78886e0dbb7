-- One row per UTC day × customer: the sums of usage_daily over keys,
-- routes and models, for the reports that need no finer grain (summary,
-- per day, per customer, top customers, billing). A month is some 28k rows
-- here against 233k in usage_daily, which makes those reports an order of
-- magnitude cheaper (benches/reports.rs).
--
-- Kept like usage_daily, by the transaction that inserts the rows, for the
-- rows actually inserted only; columns and clamping as in usage_daily.
-- Filled here once from usage_daily so that an existing database starts
-- consistent (sums in numeric, clamped as the writer clamps).
CREATE TABLE usage_customer_daily (
    day                date   NOT NULL,
    customer_id        uuid   NOT NULL,
    requests           bigint NOT NULL,
    rejected           bigint NOT NULL,
    errors             bigint NOT NULL,
    input_tokens       bigint NOT NULL,
    output_tokens      bigint NOT NULL,
    cache_read_tokens  bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    request_bytes      bigint NOT NULL,
    response_bytes     bigint NOT NULL,
    cost_nanos         bigint NOT NULL,
    PRIMARY KEY (day, customer_id)
) WITH (fillfactor = 70);

-- Per-customer reports over a date range.
CREATE INDEX usage_customer_daily_customer_day ON usage_customer_daily (customer_id, day);

INSERT INTO usage_customer_daily (
    day, customer_id, requests, rejected, errors, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, cost_nanos)
SELECT day, customer_id,
    LEAST(sum(requests), 9223372036854775807),
    LEAST(sum(rejected), 9223372036854775807),
    LEAST(sum(errors), 9223372036854775807),
    LEAST(sum(input_tokens), 9223372036854775807),
    LEAST(sum(output_tokens), 9223372036854775807),
    LEAST(sum(cache_read_tokens), 9223372036854775807),
    LEAST(sum(cache_write_tokens), 9223372036854775807),
    LEAST(sum(request_bytes), 9223372036854775807),
    LEAST(sum(response_bytes), 9223372036854775807),
    GREATEST(LEAST(sum(cost_nanos), 9223372036854775807), -9223372036854775808)
FROM usage_daily
GROUP BY day, customer_id;
