//! How results are shown: aligned tables for people, JSON for scripts (`--output json`), and
//! the calls that fetch and print in one step.

use clap::ValueEnum;
use dps_admin_client::{Client, Method, segment};
use serde_json::{Value, json};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Calls the admin API and returns its JSON answer (`None` for an empty one).
pub async fn call(
    client: &Client,
    method: Method,
    path: &str,
    scoped: bool,
    body: Option<&Value>,
    if_match: Option<&str>,
) -> anyhow::Result<Option<Value>> {
    Ok(client.call(method, path, scoped, body, if_match).await?)
}

/// GET one resource and print it.
pub async fn show(client: &Client, output: Output, path: &str, scoped: bool) -> anyhow::Result<()> {
    one(
        output,
        call(client, Method::GET, path, scoped, None, None).await?,
    );
    Ok(())
}

/// DELETE one resource and say so.
pub async fn delete(
    client: &Client,
    output: Output,
    path: &str,
    scoped: bool,
    id: &str,
) -> anyhow::Result<()> {
    call(client, Method::DELETE, path, scoped, None, None).await?;
    done(output, "deleted", id);
    Ok(())
}

/// Every item of a listing, printed with `columns`.
pub async fn list(
    client: &Client,
    output: Output,
    method: Method,
    path: &str,
    scoped: bool,
    columns: &[&str],
) -> anyhow::Result<()> {
    let items: Vec<Value> = client.pages(method, path, scoped).await?;
    table(output, &items, columns);
    Ok(())
}

/// `path` with the query of the `(name, value)` pairs that have a value, percent-encoded.
pub fn with_query(path: &str, pairs: &[(&str, &Option<String>)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.as_deref().map(|v| format!("{name}={}", segment(v))))
        .collect();
    match query.is_empty() {
        true => path.to_owned(),
        false => format!("{path}?{}", query.join("&")),
    }
}

/// Sets `key` in a JSON object when there is a value.
pub fn set_opt(body: &mut Value, key: &str, value: Option<Value>) {
    if let (Some(value), Value::Object(map)) = (value, body) {
        map.insert(key.to_owned(), value);
    }
}

/// Indented JSON.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A field by dotted path, as text for a table cell.
pub fn str_at(value: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match value.pointer(&pointer) {
        None | Some(Value::Null) => String::from("-"),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// A table of `items`, one column per dotted path in `columns` (or the JSON array).
pub fn table(output: Output, items: &[Value], columns: &[&str]) {
    if output == Output::Json {
        println!("{}", pretty(&Value::Array(items.to_vec())));
        return;
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|c| str_at(item, c)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for row in rows {
        println!("{}", line(row));
    }
}

/// One resource, as `key value` lines (nested keys dotted), or its JSON.
pub fn one(output: Output, value: Option<Value>) {
    let value = value.unwrap_or(Value::Null);
    match output {
        Output::Json => println!("{}", pretty(&value)),
        Output::Table => {
            let mut lines = Vec::new();
            flatten("", &value, &mut lines);
            let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (key, text) in lines {
                println!("{key:<width$}  {text}");
            }
        }
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, inner) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, inner, out);
            }
        }
        Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// That `what` happened to `id`.
pub fn done(output: Output, what: &str, id: &str) {
    match output {
        Output::Json => println!("{}", json!({ "result": what, "id": id })),
        Output::Table => println!("{what} {id}"),
    }
}
