//! The usage export's CSV: one RFC 4180 record per usage row.

use tollgate_metering::usage::UsageEvent;

/// The export's header row: the `usage_events` column names (README, Usage metering).
pub(crate) const CSV_HEADER: &str =
    "id,client_request_id,ts,customer_id,key_id,instance,route,method,\
path,status,outcome,latency_us,upstream_latency_us,request_bytes,response_bytes,model,\
input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,cost_nanos,cost_source\r\n";

/// Appends one usage row as an RFC 4180 record (CRLF-terminated; a field
/// with a comma, quote, CR or LF is quoted, quotes doubled; `ts` as stored,
/// RFC 3339 UTC with microseconds).
pub(crate) fn csv_row(out: &mut String, row: &UsageEvent) {
    use std::fmt::Write as _;
    let ts = row
        .ts
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        ))
        .unwrap_or_default();
    let _ = write!(out, "{},", row.id);
    csv_field(out, row.client_request_id.as_deref().unwrap_or(""));
    let _ = write!(out, ",{ts},{},{},", row.customer_id, row.key_id);
    for text in [&row.instance, &row.route, &row.method, &row.path] {
        csv_field(out, text);
        out.push(',');
    }
    let _ = write!(
        out,
        "{},{},{},{},{},{},",
        row.status,
        row.outcome.as_str(),
        row.latency_us,
        row.upstream_latency_us,
        row.request_bytes,
        row.response_bytes
    );
    csv_field(out, row.model.as_deref().unwrap_or(""));
    let _ = write!(
        out,
        ",{},{},{},{},{},{}\r\n",
        row.input_tokens,
        row.output_tokens,
        row.cache_read_tokens,
        row.cache_write_tokens,
        row.cost_nanos,
        row.cost_source.as_str()
    );
}

/// One text field. A text that a spreadsheet would run as a formula (it
/// starts with `=`, `+`, `-`, `@`, a tab or a CR) gets a `'` in front, as
/// OWASP advises: the client chooses `client_request_id`, and an export is
/// opened in spreadsheets.
fn csv_field(out: &mut String, text: &str) {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || text.contains([',', '"', '\r', '\n']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        let mut out = String::new();
        csv_field(&mut out, "plain");
        out.push('|');
        csv_field(&mut out, "a,b");
        out.push('|');
        csv_field(&mut out, "say \"hi\"\r\n");
        assert_eq!(out, "plain|\"a,b\"|\"say \"\"hi\"\"\r\n\"");
        out.clear();
        for text in ["=HYPERLINK(\"x\")", "+1", "-1", "@SUM(A1)", "\tx", "a=b"] {
            csv_field(&mut out, text);
            out.push('|');
        }
        assert_eq!(
            out,
            "\"'=HYPERLINK(\"\"x\"\")\"|\"'+1\"|\"'-1\"|\"'@SUM(A1)\"|\"'\tx\"|a=b|"
        );
        assert_eq!(CSV_HEADER.split(',').count(), 22);
    }
}
