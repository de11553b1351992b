//! Chat templates: the Jinja templates Hugging Face models ship, rendered with minijinja the way
//! transformers renders them (`trim_blocks` and `lstrip_blocks` on, Python string methods,
//! `raise_exception`, `strftime_now`, and a `tojson` that writes what Python's `json.dumps` does).

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use std::fmt::Write as _;

const NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; the error is the template's syntax error, with its line.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| describe(&e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// Renders `messages` (JSON objects with at least `role` and `content`) as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            // transformers passes these as None when a request has none, so a template's
            // `tools is not none` (or `is defined`) sees what it sees there.
            tools => Value::from(()),
            documents => Value::from(()),
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(ctx).map_err(|e| describe(&e))
    }
}

/// The template's own words for an error: the message `raise_exception` was given, or
/// minijinja's description with the line it happened on.
fn describe(e: &Error) -> String {
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            return detail.to_string();
        }
    }
    match e.line() {
        Some(line) => format!("{e} (template line {line})"),
        None => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson` filter.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String | ValueKind::Bytes | ValueKind::Plain => {
            write_string(out, value.as_str().unwrap_or(&value.to_string()))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), indent, depth, |out, i| {
                write_json(out, &items[i], indent, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '{', '}', keys.len(), indent, depth, |out, i| {
                let key = &keys[i];
                write_string(out, key.as_str().unwrap_or(&key.to_string()));
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, depth + 1)
            })?;
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialize a {}", value.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's separators: `", "` between items without indent, newline and indent with it.
fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    indent: Option<usize>,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        match indent {
            Some(width) => {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.extend(std::iter::repeat_n(' ', width * (depth + 1)));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        item(out, i)?;
    }
    if let Some(width) = indent {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', width * depth));
    }
    out.push(close);
    Ok(())
}

/// Integers as they are; floats as Python's `repr` (`1.0`, not `1`).
fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
            let _ = write!(out, "{f:.1}");
        }
        Ok(f) if f.is_finite() => {
            let _ = write!(out, "{f}");
        }
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f > 0.0 => out.push_str("Infinity"),
        Ok(_) => out.push_str("-Infinity"),
        Err(_) => {
            let _ = write!(out, "{value}");
        }
    }
}

/// A JSON string with `ensure_ascii=False`: only quotes, backslashes and control characters
/// are escaped.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers passes `strftime_now(format)`: the current UTC time, formatted with the common
/// `strftime` directives (`%d %m %Y %y %b %B %a %A %H %M %S %j %%`; others are kept as written).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format_utc(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, usize, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as usize, day)
}

/// Days since 1970-01-01 of a date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn format_utc(secs: i64, format: &str) -> String {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let year_start = days_from_civil(year, 1, 1);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('d') => write!(out, "{day:02}"),
            Some('m') => write!(out, "{month:02}"),
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('b') => write!(out, "{}", &MONTHS[month - 1][..3]),
            Some('B') => write!(out, "{}", MONTHS[month - 1]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('H') => write!(out, "{:02}", in_day / 3600),
            Some('M') => write!(out, "{:02}", in_day / 60 % 60),
            Some('S') => write!(out, "{:02}", in_day % 60),
            Some('j') => write!(out, "{:03}", days - year_start + 1),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, String> {
        let template = ChatTemplate::new(source, Some("<s>"), Some("</s>"))?;
        let list = messages.as_array().cloned().unwrap_or_default();
        template.render(&list, true)
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_does() {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        let out = render(source, json!([{"role": "user", "content": "hi"}])).unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn python_string_methods_and_special_tokens() {
        let source = "{{ bos_token }}{{ messages[0]['content'].strip().upper() }}{% if messages[0].content.startswith(' x') %}!{% endif %}{{ eos_token }}";
        let out = render(source, json!([{"role": "user", "content": " xy "}])).unwrap();
        assert_eq!(out, "<s>XY!</s>");
    }

    #[test]
    fn raise_exception_message_is_the_error() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}";
        let err = render(source, json!([{"role": "assistant", "content": "x"}])).unwrap_err();
        assert_eq!(err, "Conversation roles must alternate user/assistant");
    }

    #[test]
    fn syntax_errors_are_refused_with_their_line() {
        let err =
            ChatTemplate::new("{% for m in messages %}\n{{ m.content ", None, None).unwrap_err();
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let source = "{{ messages[0] | tojson }}|{{ messages[0].x | tojson(indent=2) }}";
        let out = render(
            source,
            json!([{"role": "user", "content": "é \"q\"\n", "x": [1, 2.5, 3.0, true, null]}]),
        )
        .unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"é \\\"q\\\"\\n\", \"x\": [1, 2.5, 3.0, true, null]}|[\n  1,\n  2.5,\n  3.0,\n  true,\n  null\n]"
        );
    }

    #[test]
    fn tools_and_documents_are_none_as_in_transformers() {
        // Mistral-style templates test `tools is not none`; an undefined value is not none.
        let source = "{% if tools is not none %}[TOOLS]{% endif %}{% if documents is defined and documents is none %}no docs{% endif %}";
        let out = render(source, json!([{"role": "user", "content": "a"}])).unwrap();
        assert_eq!(out, "no docs");
    }

    #[test]
    fn loop_controls_and_namespace_work() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}";
        let out = render(source, json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}])).unwrap();
        assert_eq!(out, "2");
    }

    #[test]
    fn dates_format_like_strftime() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of the year.
        let secs = 1_722_000_309;
        assert_eq!(
            format_utc(secs, "%d %b %Y %H:%M:%S %A %j %y %B %%"),
            "26 Jul 2024 13:25:09 Friday 208 24 July %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }
}
