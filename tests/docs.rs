//! The operator docs against the code, so that they cannot drift apart:
//!
//! - every key of `config/tollgate.example.toml` (commented-out ones too) is
//!   in the reference of `docs/CONFIGURATION.md`, under its section;
//! - every key that reference documents is accepted by the real parser, with
//!   the documented defaults, and an undocumented key is refused;
//! - the example itself passes `tollgate check-config`;
//! - every setting that chooses between named behaviours lists its choices,
//!   and the parser takes exactly those;
//! - `docs/METRICS.md` catalogues exactly the metrics Tollgate exports, with
//!   their types and labels;
//! - config keys named in the README and the docs are documented keys;
//! - every page under `docs/` is linked from the README, and every relative
//!   link in the README and the docs names a file the repository has;
//! - `docs/openapi.json` is exactly the document the admin API serves
//!   (`TOLLGATE_UPDATE_OPENAPI=1` rewrites it from the code).
//!
//! No database server is needed (the gateway that serves the OpenAPI
//! document runs on an embedded SQLite file).

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use tollgate::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every metric Tollgate exports: name, type and labels. `tests/metrics.rs`
/// checks the live `/metrics` against the same names; when a metric is
/// added or changed, this list and docs/METRICS.md change with it.
const EXPORTED_METRICS: &[(&str, &str, &[&str])] = &[
    (
        "tollgate_requests_total",
        "counter",
        &["route", "status_class", "outcome"],
    ),
    ("tollgate_request_duration_seconds", "histogram", &["route"]),
    (
        "tollgate_upstream_duration_seconds",
        "histogram",
        &["route"],
    ),
    ("tollgate_auth_failures_total", "counter", &["reason"]),
    ("tollgate_limit_rejections_total", "counter", &["limit"]),
    ("tollgate_usage_rows_total", "counter", &["result"]),
    ("tollgate_usage_flush_duration_seconds", "histogram", &[]),
    ("tollgate_usage_batch_rows", "histogram", &[]),
    ("tollgate_usage_pending_rows", "gauge", &[]),
    ("tollgate_usage_spool_bytes", "gauge", &[]),
    ("tollgate_cost_nanos_total", "counter", &["route", "model"]),
    (
        "tollgate_tokens_total",
        "counter",
        &["route", "model", "direction"],
    ),
    ("tollgate_database_up", "gauge", &[]),
    ("tollgate_metering_unavailable_total", "counter", &[]),
    ("tollgate_keys_cached", "gauge", &[]),
    (
        "tollgate_upstream_errors_total",
        "counter",
        &["route", "kind"],
    ),
    (
        "tollgate_usage_invalid_values_total",
        "counter",
        &["route", "field"],
    ),
    ("tollgate_open_connections", "gauge", &["listener"]),
    (
        "tollgate_webhook_deliveries_total",
        "counter",
        &["event", "result"],
    ),
    ("tollgate_webhook_pending", "gauge", &[]),
];

/// Sections written `[[name]]`: one table per entry.
const ARRAY_SECTIONS: &[&str] = &["tiers", "routes", "webhooks"];

/// Sections a reload applies; every other key needs a restart.
const RELOADABLE_SECTIONS: &[&str] = &["tiers", "routes", "pricing.*", "webhooks"];

/// Top-level tables with fixed keys, as config keys are written in prose
/// (`usage.spool_max`).
const PLAIN_SECTIONS: &[&str] = &["server", "admin", "database", "keys", "usage"];

fn read(relative: &str) -> String {
    let path = Path::new(ROOT).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{relative}: {error}"))
}

/// The contents of the inline code spans of `text` (one line of markdown).
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// `[server]` -> `server`, `[[tiers]]` -> `tiers`, `[pricing."gpt-4o"]` and
/// `[pricing."<model>"]` -> `pricing.*`: a quoted key stands for any name.
fn normalize_section(header: &str) -> String {
    let inner = header.trim().trim_start_matches('[').trim_end_matches(']');
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
            }
            out.push('*');
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// Whether `text` is a TOML value (`"10s"`, `16`, `["a"]`, `{ a = "b" }`).
fn is_toml_value(text: &str) -> bool {
    toml::from_str::<toml::Table>(&format!("v = {text}")).is_ok()
}

/// One row of a reference table in docs/CONFIGURATION.md.
#[derive(Debug, Clone)]
struct DocKey {
    section: String,
    key: String,
    default: String,
    applied: String,
    description: String,
}

impl DocKey {
    fn path(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }

    fn required(&self) -> bool {
        self.default == "required"
    }

    /// The default as a TOML value, when the Default column gives one.
    fn literal_default(&self) -> Option<&str> {
        code_spans(&self.default)
            .first()
            .copied()
            .filter(|span| is_toml_value(span))
    }

    /// A value the key accepts: its literal default, else the example
    /// the description gives ("e.g. `...`").
    fn sample(&self) -> Option<&str> {
        self.literal_default().or_else(|| {
            let (_, rest) = self.description.split_once("e.g. `")?;
            let (span, _) = rest.split_once('`')?;
            is_toml_value(span).then_some(span)
        })
    }
}

/// The reference of docs/CONFIGURATION.md: the tables under `## Reference`,
/// one `### `[section]`` heading each.
fn documented_keys() -> Vec<DocKey> {
    let doc = read("docs/CONFIGURATION.md");
    let mut keys = Vec::new();
    let mut in_reference = false;
    let mut section: Option<String> = None;
    for (index, line) in doc.lines().enumerate() {
        let at = index + 1;
        if let Some(title) = line.strip_prefix("## ") {
            in_reference = title.trim() == "Reference";
            section = None;
            continue;
        }
        if !in_reference {
            continue;
        }
        if let Some(title) = line.strip_prefix("### ") {
            let header = code_spans(title);
            assert_eq!(header.len(), 1, "CONFIGURATION.md:{at}: {line}");
            section = Some(normalize_section(header[0]));
            continue;
        }
        if !line.starts_with("| `") {
            continue;
        }
        let section = section
            .clone()
            .unwrap_or_else(|| panic!("CONFIGURATION.md:{at}: a key row outside a section"));
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        assert_eq!(
            cells.len(),
            5,
            "CONFIGURATION.md:{at}: expected | Key | Type | Default | Applied | Description |: {line}"
        );
        let key = code_spans(cells[0]);
        assert_eq!(key.len(), 1, "CONFIGURATION.md:{at}: {line}");
        keys.push(DocKey {
            section,
            key: key[0].to_owned(),
            default: cells[2].to_owned(),
            applied: cells[3].to_owned(),
            description: cells[4].to_owned(),
        });
    }
    assert!(
        keys.len() >= 40,
        "CONFIGURATION.md: only {} keys found under ## Reference",
        keys.len()
    );
    keys
}

/// Every key that config/tollgate.example.toml shows, as (section, key),
/// including commented-out settings (`# tls = { ... }`). A commented line
/// is a setting when what follows `#` parses as one TOML key/value; inline
/// tables contribute their keys (`tls.cert`). The entries of
/// `[routes.set_headers]` are header names, not keys: the table itself is
/// the key `set_headers` of `routes`.
fn example_keys() -> BTreeSet<(String, String)> {
    let text = read("config/tollgate.example.toml");
    let mut keys = BTreeSet::new();
    let mut section: Option<String> = None;
    let mut free_form = false;
    for line in text.lines() {
        let line = line.trim();
        // A commented-out section (`# [[webhooks]]`) opens its section too.
        let header = line
            .strip_prefix("# ")
            .filter(|rest| rest.starts_with("[["))
            .unwrap_or(line);
        if header.starts_with('[') {
            let name = normalize_section(header);
            match name.rsplit_once('.') {
                Some((parent, "set_headers")) => {
                    keys.insert((parent.to_owned(), "set_headers".to_owned()));
                    free_form = true;
                }
                _ => free_form = false,
            }
            section = Some(name);
            continue;
        }
        let Some(section) = &section else {
            continue; // the file's introduction
        };
        if free_form {
            continue;
        }
        let setting = line.strip_prefix('#').map(str::trim_start).unwrap_or(line);
        let Ok(table) = toml::from_str::<toml::Table>(setting) else {
            continue; // prose
        };
        if table.len() != 1 || !line.contains('=') {
            continue;
        }
        for (key, value) in &table {
            keys.insert((section.clone(), key.clone()));
            if let Some(inner) = value.as_table() {
                for sub in inner.keys() {
                    keys.insert((section.clone(), format!("{key}.{sub}")));
                }
            }
        }
    }
    keys
}

/// The table header that opens `section` in a generated file.
fn section_header(section: &str) -> String {
    if ARRAY_SECTIONS.contains(&section) {
        format!("[[{section}]]")
    } else {
        format!("[{}]", section.replace('*', "\"doc-model\""))
    }
}

/// Documented keys grouped by section, in document order.
fn by_section(keys: &[DocKey]) -> Vec<(String, Vec<DocKey>)> {
    let mut sections: Vec<(String, Vec<DocKey>)> = Vec::new();
    for key in keys {
        match sections.iter_mut().find(|(name, _)| *name == key.section) {
            Some((_, rows)) => rows.push(key.clone()),
            None => sections.push((key.section.clone(), vec![key.clone()])),
        }
    }
    sections
}

/// A config file with, in each documented section, the keys `pick` chooses
/// (with the value it gives) and then the `extra` lines for that section.
fn generate(
    keys: &[DocKey],
    pick: impl Fn(&DocKey, &[DocKey]) -> Option<String>,
    extra: impl Fn(&str) -> Option<String>,
) -> String {
    let mut text = String::new();
    for (section, rows) in by_section(keys) {
        text.push_str(&section_header(&section));
        text.push('\n');
        for row in &rows {
            if let Some(value) = pick(row, &rows) {
                text.push_str(&format!("{} = {value}\n", row.key));
            }
        }
        if let Some(extra) = extra(&section) {
            text.push_str(&extra);
            text.push('\n');
        }
        text.push('\n');
    }
    text
}

/// Whether `row` is a table documented through its own keys (`tls`, with
/// `tls.cert` and `tls.key`): those are written instead of the table.
fn has_documented_keys(row: &DocKey, rows: &[DocKey]) -> bool {
    let prefix = format!("{}.", row.key);
    rows.iter().any(|other| other.key.starts_with(&prefix))
}

/// The names of the `${VAR}`s used in `text`.
fn env_vars(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(name, _)| name.to_owned())
        .filter(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

/// `tollgate check-config --config path`, with every `${VAR}` of the file
/// set in the environment: (exit code, stdout, stderr).
fn check_config(path: &Path) -> (i32, String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut command = Command::new(common::binary());
    command.arg("check-config").arg("--config").arg(path);
    for var in env_vars(&text) {
        command.env(var, "doc-test-value");
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn parse(text: &str) -> Config {
    Config::parse(text, "documented.toml", &common::test_env).unwrap_or_else(|error| {
        panic!("{error}\n--- generated from docs/CONFIGURATION.md:\n{text}")
    })
}

// ---- (a) the example is documented ---------------------------------------

#[test]
fn every_key_of_the_example_is_in_the_configuration_reference() {
    let example = example_keys();
    // The scan must see plain, commented-out, inline-table and sub-table keys,
    // or this test could pass by finding nothing.
    for expected in [
        ("server", "listen"),
        ("server", "tls"),
        ("server", "tls.cert"),
        ("server", "instance_id"),
        ("admin", "tokens"),
        ("usage", "on_spool_full"),
        ("tiers", "overage_price_per_request_usd"),
        ("routes", "set_headers"),
        ("pricing.*", "cache_write"),
    ] {
        assert!(
            example.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "the example scan missed {}.{}: {example:?}",
            expected.0,
            expected.1
        );
    }
    let documented: BTreeSet<(String, String)> = documented_keys()
        .into_iter()
        .map(|key| (key.section, key.key))
        .collect();
    let missing: Vec<String> = example
        .difference(&documented)
        .map(|(section, key)| format!("{section}.{key}"))
        .collect();
    assert!(
        missing.is_empty(),
        "config/tollgate.example.toml has keys docs/CONFIGURATION.md does not document: {missing:?}"
    );
}

// ---- (b) the reference is what the parser accepts ------------------------

#[test]
fn the_reference_tables_are_well_formed() {
    let keys = documented_keys();
    let mut seen = BTreeSet::new();
    for key in &keys {
        assert!(
            seen.insert(key.path()),
            "{} is documented twice",
            key.path()
        );
        let expected = if RELOADABLE_SECTIONS.contains(&key.section.as_str()) {
            "reload"
        } else {
            "restart"
        };
        assert_eq!(key.applied, expected, "Applied column of {}", key.path());
        assert!(
            key.sample().is_some() || has_documented_keys(key, &keys_of(&keys, &key.section)),
            "{}: give a TOML default or an \"e.g. `value`\" in the description",
            key.path()
        );
    }
}

/// Settings that choose between named behaviours: each lists its choices
/// (`"reject"`, `"serve"`) in its description.
const CHOICE_KEYS: &[&str] = &["usage.on_spool_full", "tiers.overage", "routes.usage"];

/// The quoted string literals among the code spans of `text`: the choices
/// a description names.
fn string_choices(text: &str) -> Vec<String> {
    code_spans(text)
        .into_iter()
        .filter(|span| span.len() > 2 && span.starts_with('"') && span.ends_with('"'))
        .filter(|span| is_toml_value(span))
        .map(str::to_owned)
        .collect()
}

#[test]
fn documented_choices_are_exactly_what_the_parser_accepts() {
    let keys = documented_keys();
    let required = |row: &DocKey| {
        row.required()
            .then(|| row.sample().map(str::to_owned))
            .flatten()
    };
    let with = |path: &str, value: &str| {
        generate(
            &keys,
            |row, _| {
                if row.path() == path {
                    Some(value.to_owned())
                } else {
                    required(row)
                }
            },
            |_| None,
        )
    };
    for path in CHOICE_KEYS {
        let key = keys.iter().find(|key| key.path() == *path).unwrap();
        let choices = string_choices(&key.description);
        assert!(
            choices.len() >= 2,
            "{path}: the description must list its choices as `\"...\"`: {choices:?}"
        );
        let default = key
            .literal_default()
            .unwrap_or_else(|| panic!("{path}: no default"));
        assert!(
            choices.iter().any(|choice| choice == default),
            "{path}: the default {default} is not among the documented choices {choices:?}"
        );
        for choice in &choices {
            parse(&with(path, choice));
        }
        let text = with(path, "\"no-such-choice\"");
        let error = Config::parse(&text, "choices.toml", &common::test_env)
            .expect_err(&format!("{path} accepted an undocumented choice:\n{text}"));
        let name = path.rsplit('.').next().unwrap();
        assert!(
            error.to_string().contains(name),
            "{path}: the error does not name the key: {error}"
        );
    }
}

fn keys_of(keys: &[DocKey], section: &str) -> Vec<DocKey> {
    keys.iter()
        .filter(|key| key.section == section)
        .cloned()
        .collect()
}

/// PEM files for the route keys whose files are read when the config is
/// loaded (`ca_file`, `client_cert`): the documented sample paths do not
/// exist, so the generated file points these keys at real ones.
fn pem_files(dir: &Path) -> BTreeMap<&'static str, String> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    let file = |name: &str, contents: &str| {
        format!(
            "{:?}",
            common::write_file(dir, name, contents)
                .display()
                .to_string()
        )
    };
    BTreeMap::from([
        ("routes.ca_file", file("ca.pem", &ca.pem())),
        ("routes.client_cert.cert", file("client.pem", &client.pem())),
        (
            "routes.client_cert.key",
            file("client.key", &client_key.serialize_pem()),
        ),
    ])
}

#[test]
fn every_documented_key_is_accepted_by_the_parser() {
    let keys = documented_keys();
    let dir = tempfile::tempdir().unwrap();
    let pems = pem_files(dir.path());
    let text = generate(
        &keys,
        |row, rows| {
            if has_documented_keys(row, rows) {
                None
            } else if let Some(path) = pems.get(row.path().as_str()) {
                Some(path.clone())
            } else {
                row.sample().map(str::to_owned)
            }
        },
        |_| None,
    );
    let config = parse(&text);
    // Every section made it in (one entry each).
    assert_eq!(config.tiers.len(), 1, "{text}");
    assert_eq!(config.routes.len(), 1, "{text}");
    assert_eq!(config.pricing.len(), 1, "{text}");
    assert!(config.server.tls.is_some(), "{text}");
    assert!(!config.routes[0].set_headers.is_empty(), "{text}");
    assert!(config.admin.tls.is_some(), "{text}");
    assert!(
        config.routes[0]
            .tls
            .as_ref()
            .is_some_and(|tls| tls.upstream.has_client_cert()),
        "{text}"
    );

    // The real binary agrees.
    let path = common::write_file(dir.path(), "documented.toml", &text);
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, 0, "check-config: {stderr}\n{text}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn the_documented_defaults_are_the_parsers_defaults() {
    let keys = documented_keys();
    let required = |row: &DocKey, _: &[DocKey]| {
        row.required()
            .then(|| row.sample().map(str::to_owned))
            .flatten()
    };
    let bare = generate(&keys, required, |_| None);
    let with_defaults = generate(
        &keys,
        |row, rows| required(row, rows).or_else(|| row.literal_default().map(str::to_owned)),
        |_| None,
    );
    let literal_defaults = keys
        .iter()
        .filter(|key| !key.required() && key.literal_default().is_some())
        .count();
    assert!(
        literal_defaults >= 20,
        "only {literal_defaults} literal defaults documented"
    );
    assert_eq!(
        parse(&with_defaults),
        parse(&bare),
        "a default in docs/CONFIGURATION.md differs from the parser's:\n{with_defaults}"
    );
}

#[test]
fn an_undocumented_key_is_refused_in_every_section() {
    let keys = documented_keys();
    let required = |row: &DocKey, _: &[DocKey]| {
        row.required()
            .then(|| row.sample().map(str::to_owned))
            .flatten()
    };
    let sections: Vec<String> = by_section(&keys).into_iter().map(|(s, _)| s).collect();
    for section in &sections {
        let text = generate(&keys, required, |s| {
            (s == section).then(|| "undocumented_key = 1".to_owned())
        });
        let error = Config::parse(&text, "undocumented.toml", &common::test_env).expect_err(
            &format!("an unknown key in {section} was accepted:\n{text}"),
        );
        assert!(
            error.to_string().contains("undocumented_key"),
            "{section}: {error}"
        );
    }

    // And the binary says so with exit code 2.
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_file(
        dir.path(),
        "unknown.toml",
        "[server]\nundocumented_key = true\n",
    );
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("undocumented_key"), "{stderr}");
}

// ---- (c) the example is valid ----------------------------------------------

#[test]
fn the_example_passes_check_config() {
    let path = Path::new(ROOT).join("config/tollgate.example.toml");
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, 0, "check-config on the example: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

// ---- (d) the metrics catalogue is what Tollgate exports ---------------------

/// One `### `name`` entry of the catalogue in docs/METRICS.md.
#[derive(Debug, Default)]
struct DocMetric {
    kind: Option<String>,
    labels: Option<Vec<String>>,
}

fn catalogue(doc: &str) -> BTreeMap<String, DocMetric> {
    let mut metrics: BTreeMap<String, DocMetric> = BTreeMap::new();
    let mut in_catalogue = false;
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            in_catalogue = title.trim() == "Catalogue";
            current = None;
            continue;
        }
        if !in_catalogue {
            continue;
        }
        if let Some(title) = line.strip_prefix("### ") {
            let spans = code_spans(title);
            assert_eq!(spans.len(), 1, "METRICS.md: {line}");
            let name = spans[0].to_owned();
            assert!(
                metrics.insert(name.clone(), DocMetric::default()).is_none(),
                "METRICS.md: {name} is catalogued twice"
            );
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let entry = metrics.get_mut(name).unwrap();
        if let Some(kind) = line.strip_prefix("- Type: ") {
            entry.kind = Some(kind.trim().to_owned());
        } else if let Some(labels) = line.strip_prefix("- Labels: ") {
            entry.labels = Some(if labels.trim() == "none" {
                Vec::new()
            } else {
                code_spans(labels).into_iter().map(str::to_owned).collect()
            });
        }
    }
    metrics
}

/// Every `tollgate_...` metric-like word in `text`.
fn metric_words(text: &str) -> BTreeSet<String> {
    let mut words = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tollgate_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            words.insert(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    words
}

#[test]
fn the_metrics_catalogue_is_exactly_the_exported_metrics() {
    let doc = read("docs/METRICS.md");
    let catalogue = catalogue(&doc);

    let exported: BTreeSet<&str> = EXPORTED_METRICS.iter().map(|(name, _, _)| *name).collect();
    let documented: BTreeSet<&str> = catalogue.keys().map(String::as_str).collect();
    assert_eq!(
        documented, exported,
        "docs/METRICS.md's catalogue and the exported metrics differ"
    );

    for (name, kind, labels) in EXPORTED_METRICS {
        let entry = &catalogue[*name];
        assert_eq!(entry.kind.as_deref(), Some(*kind), "type of {name}");
        let expected: Vec<String> = labels.iter().map(|label| (*label).to_owned()).collect();
        assert_eq!(entry.labels.as_ref(), Some(&expected), "labels of {name}");
    }

    // Anywhere on the page (PromQL, alerts), only exported names, or a
    // histogram's series (`_bucket`, `_sum`, `_count`).
    let histograms: BTreeSet<&str> = EXPORTED_METRICS
        .iter()
        .filter(|(_, kind, _)| *kind == "histogram")
        .map(|(name, _, _)| *name)
        .collect();
    for word in metric_words(&doc) {
        let series_of_histogram = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            word.strip_suffix(suffix)
                .is_some_and(|base| histograms.contains(base))
        });
        assert!(
            exported.contains(word.as_str()) || series_of_histogram,
            "docs/METRICS.md names {word}, which is not an exported metric"
        );
    }
}

// ---- config keys named in prose ---------------------------------------------

/// The README and every page under `docs/`.
const OPERATOR_DOCS: &[&str] = &[
    "README.md",
    "docs/ADMIN-API.md",
    "docs/ARCHITECTURE.md",
    "docs/CLI.md",
    "docs/CONFIGURATION.md",
    "docs/HTTP.md",
    "docs/METRICS.md",
    "docs/PERFORMANCE.md",
    "docs/RUNBOOK.md",
    "docs/STORAGE.md",
];

/// `section.key` references in the operator docs (`usage.spool_max`,
/// `server.access_log = true`) must be documented keys.
#[test]
fn config_keys_named_in_the_docs_are_documented() {
    let documented: BTreeSet<String> = documented_keys().iter().map(DocKey::path).collect();
    for file in OPERATOR_DOCS {
        let text = read(file);
        // Fenced blocks would upset the pairing of backticks.
        let mut prose = String::new();
        let mut fenced = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
            } else if !fenced {
                prose.push_str(line);
                prose.push('\n');
            }
        }
        let mut checked = 0;
        for span in code_spans(&prose) {
            let reference = span.split([' ', '=']).next().unwrap_or_default();
            let Some((section, key)) = reference.split_once('.') else {
                continue;
            };
            if !PLAIN_SECTIONS.contains(&section)
                || key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
            {
                continue;
            }
            checked += 1;
            assert!(
                documented.contains(reference),
                "{file} names `{reference}`, which docs/CONFIGURATION.md does not document"
            );
        }
        if !["docs/METRICS.md", "docs/PERFORMANCE.md"].contains(file) {
            assert!(checked > 0, "{file}: no config key references found");
        }
    }
}

// ---- the docs are whole -------------------------------------------------------

/// The targets of the markdown links `](target)` in `text`.
fn link_targets(text: &str) -> Vec<&str> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target))
        .collect()
}

/// Every page under `docs/` is one of `OPERATOR_DOCS` and is linked from
/// the README, so a reader who starts there finds the whole contract.
#[test]
fn every_doc_page_is_listed_and_linked_from_the_readme() {
    let readme = read("README.md");
    let linked: BTreeSet<&str> = link_targets(&readme)
        .into_iter()
        .map(|target| target.split('#').next().unwrap_or_default())
        .collect();
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    assert!(pages.len() >= 5, "docs/: {pages:?}");
    for page in &pages {
        assert!(
            OPERATOR_DOCS.contains(&page.as_str()),
            "{page} is not in OPERATOR_DOCS"
        );
        assert!(
            linked.contains(page.as_str()),
            "README.md does not link {page}"
        );
    }
}

/// Every relative link in the README and the docs names a file or
/// directory the repository has: the docs refer to nothing it lacks.
#[test]
fn relative_links_in_the_docs_resolve() {
    let mut checked = 0;
    for file in OPERATOR_DOCS {
        let text = read(file);
        let base = Path::new(ROOT).join(file);
        let dir = base.parent().unwrap();
        for target in link_targets(&text) {
            let path = target.split('#').next().unwrap_or_default();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            assert!(
                dir.join(path).exists(),
                "{file} links to {target}, which the repository does not have"
            );
        }
    }
    assert!(checked >= 10, "only {checked} relative links found");
}

/// `docs/openapi.json` is what `GET /v1/openapi.json` serves, without a
/// token; `TOLLGATE_UPDATE_OPENAPI=1` rewrites the file from the code.
#[tokio::test]
async fn the_shipped_openapi_document_is_the_served_one() {
    let gateway = common::TestGateway::start(common::config("")).await;
    let served = common::get(&format!("http://{}/v1/openapi.json", gateway.admin)).await;
    assert_eq!(served.status, http::StatusCode::OK);
    let document: serde_json::Value = serde_json::from_slice(&served.body).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("TOLLGATE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &served.body).unwrap();
    }
    let shipped = std::fs::read(&path).unwrap_or_default();
    assert!(
        shipped == served.body,
        "docs/openapi.json differs from what the admin API serves; \
         rewrite it with `TOLLGATE_UPDATE_OPENAPI=1 cargo test --test docs`"
    );
}
