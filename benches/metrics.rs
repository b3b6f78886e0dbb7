//! What metrics cost a request: everything the data plane records for one
//! metered request (`tollgate_requests_total`, both duration histograms,
//! tokens in four directions and cost, under a priced model) through the
//! gateway's ready handles, against the obvious way, the `metrics` macros
//! on a global Prometheus recorder, which look every series up by name and
//! labels on every call. Also a scrape of 50 routes × 10 models.
//!
//! Run: `cargo bench --bench metrics`. Compare the ratio, not absolute times.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use metrics_exporter_prometheus::PrometheusBuilder;
use time::OffsetDateTime;
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent};
use tollgate_metering::usage::{ModelPrice, Pricing};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_proxy::{Metrics, RequestOutcome};
use uuid::Uuid;

fn pricing(models: usize) -> Pricing {
    // Nano-USD per million tokens.
    let price = || ModelPrice {
        input: 150_000_000,
        output: 600_000_000,
        cache_read: 75_000_000,
        cache_write: 150_000_000,
    };
    Pricing::new((0..models).map(|i| {
        let name = if i == 0 {
            "gpt-4o-mini".to_owned()
        } else {
            format!("model-{i}")
        };
        (name, price())
    }))
}

fn event() -> UsageEvent {
    UsageEvent {
        id: Uuid::now_v7(),
        client_request_id: None,
        ts: OffsetDateTime::now_utc(),
        customer_id: CustomerId::new(),
        key_id: KeyId::new(),
        instance: "gw-1".to_owned(),
        route: "llm".to_owned(),
        method: "POST".to_owned(),
        path: "/v1/chat/completions".to_owned(),
        status: 200,
        outcome: Outcome::Ok,
        latency_us: 1_200,
        upstream_latency_us: 1_000,
        request_bytes: 400,
        response_bytes: 1_200,
        model: Some("gpt-4o-mini-2024-07-18".to_owned()),
        input_tokens: 120,
        output_tokens: 40,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_nanos: 42_000,
        cost_source: CostSource::Pricing,
    }
}

fn per_request(c: &mut Criterion) {
    let pricing = pricing(10);
    let metrics = Metrics::new();
    let route = metrics.route("llm", &pricing);
    let event = event();
    let took = Duration::from_micros(1_200);

    let mut group = c.benchmark_group("metrics per request");
    group.bench_function("tollgate handles", |b| {
        b.iter(|| {
            route.request(200, RequestOutcome::Usage(Outcome::Ok), black_box(took));
            route.upstream_answered(black_box(took));
            route.usage(black_box(&event), &pricing);
        })
    });

    // The baseline: the same series through the macros and a global
    // recorder, the model label resolved the same way.
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::set_global_recorder(recorder).unwrap();
    group.bench_function("metrics macros, global recorder", |b| {
        b.iter(|| {
            let event = black_box(&event);
            let route = event.route.clone();
            metrics::counter!("tollgate_requests_total", "route" => route.clone(),
                "status_class" => "2xx", "outcome" => "ok")
            .increment(1);
            metrics::histogram!("tollgate_request_duration_seconds", "route" => route.clone())
                .record(took.as_secs_f64());
            metrics::histogram!("tollgate_upstream_duration_seconds", "route" => route.clone())
                .record(took.as_secs_f64());
            let model = event
                .model
                .as_deref()
                .and_then(|model| pricing.resolve(model))
                .map_or("other", |(name, _)| name)
                .to_owned();
            metrics::counter!("tollgate_cost_nanos_total", "route" => route.clone(), "model" => model.clone())
                .increment(event.cost_nanos as u64);
            for (direction, count) in [
                ("input", event.input_tokens),
                ("output", event.output_tokens),
                ("cache_read", event.cache_read_tokens),
                ("cache_write", event.cache_write_tokens),
            ] {
                metrics::counter!("tollgate_tokens_total", "route" => route.clone(),
                    "model" => model.clone(), "direction" => direction)
                .increment(count);
            }
        })
    });
    group.finish();
}

fn scrape(c: &mut Criterion) {
    let pricing = pricing(10);
    let metrics = Metrics::new();
    let routes: Vec<_> = (0..50)
        .map(|i| metrics.route(&format!("route-{i}"), &pricing))
        .collect();
    let mut event = event();
    for route in &routes {
        for model in pricing.models().map(str::to_owned).collect::<Vec<_>>() {
            event.model = Some(model);
            route.request(
                200,
                RequestOutcome::Usage(Outcome::Ok),
                Duration::from_millis(3),
            );
            route.upstream_answered(Duration::from_millis(2));
            route.usage(&event, &pricing);
        }
    }
    c.bench_function("scrape, 50 routes x 10 models", |b| {
        b.iter(|| black_box(metrics.render().len()))
    });
}

criterion_group!(benches, per_request, scrape);
criterion_main!(benches);
