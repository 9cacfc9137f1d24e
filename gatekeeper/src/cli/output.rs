//! What the client prints: tables (comfy-table, borderless like kubectl's), JSON and YAML, written
//! to standard output through a writer that takes a closed pipe (`| head -1`) as the reader
//! having seen enough, not as an error.

use std::io::Write as _;

use clap::ValueEnum;
use serde_json::Value;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Human-readable tables and text.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
    /// The API's JSON as YAML.
    Yaml,
}

/// Writes `text` and a newline to standard output. A closed pipe is success: the reader stopped
/// reading (Rust ignores SIGPIPE, so the write fails with `BrokenPipe` instead of killing us).
pub fn write_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let written = out.write_all(text.as_bytes()).and_then(|()| {
        if !text.ends_with('\n') {
            out.write_all(b"\n")?;
        }
        out.flush()
    });
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes `text` and a newline to standard error, ignoring failures (there is nowhere else to
/// say them).
pub fn write_stderr(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// `value` as `output` says: JSON, YAML, or the table/text `human` makes of it.
pub fn render(output: Output, value: &Value, human: impl FnOnce(&Value) -> String) -> Result<String, String> {
    match output {
        Output::Json => serde_json::to_string_pretty(value).map_err(|e| format!("writing JSON: {e}")),
        Output::Yaml => serde_saphyr::to_string(value).map_err(|e| format!("writing YAML: {e}")),
        Output::Table => Ok(human(value)),
    }
}

/// A borderless table with a header row, columns three spaces apart.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING).set_header(headers.to_vec()).add_rows(rows);
    finish(t)
}

/// `Key:  value` lines (a value may span lines), aligned.
pub fn fields(rows: Vec<(&str, String)>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING).add_rows(rows.into_iter().map(|(k, v)| vec![format!("{k}:"), v]));
    finish(t)
}

fn finish(mut t: comfy_table::Table) -> String {
    for c in t.column_iter_mut() {
        c.set_padding((0, 3));
    }
    // The style pads the last column too: nothing should trail a line.
    t.trim_fmt()
}

/// A cell: strings bare, lists comma-separated, maps as `k=v,...`, null empty.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_align_columns_without_borders_or_trailing_space() {
        let t = table(&["NAME", "IPS"], vec![vec!["plc-1".into(), "10.0.0.1".into()], vec!["a".into(), "b".into()]]);
        assert_eq!(t, "NAME    IPS\nplc-1   10.0.0.1\na       b");
        let f = fields(vec![("Name", "plc-1".into()), ("Tags", "role=plc\nsite=x".into())]);
        assert_eq!(f, "Name:   plc-1\nTags:   role=plc\n        site=x");
    }

    #[test]
    fn yaml_output_parses_back() {
        let v = json!({"name": "plc-1", "tags": {"zone": "cell: 1"}, "ips": ["10.0.0.1"], "n": 3});
        let text = render(Output::Yaml, &v, |_| unreachable!()).unwrap();
        let back: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, v);
        assert_eq!(cell(&json!({"a": "b", "c": ["d", 1]})), "a=b,c=d,1");
    }
}
