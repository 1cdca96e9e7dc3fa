//! The README's "A first session" is a tested claim: each `$ curl …` there
//! is sent to the real binary (the embedded defaults: echo runtime, SQLite
//! state), and the answer printed under it must be what the server sends,
//! key for key and in the server's order. Values that differ from run to
//! run (ids, timestamps, counters) are compared by kind only; an example
//! the README marks "shortened" may leave keys out, never reorder them.

mod common;

use std::path::PathBuf;

use common::{request, Daemon};

/// A JSON value with the order of its object keys kept.
#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

fn parse(text: &str) -> Json {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value();
    p.ws();
    assert_eq!(p.i, p.s.len(), "trailing text after JSON: {text}");
    v
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut fields = Vec::new();
                loop {
                    self.ws();
                    if self.s[self.i] == b'}' {
                        self.i += 1;
                        return Json::Obj(fields);
                    }
                    let key = self.string();
                    self.ws();
                    assert_eq!(self.s[self.i], b':');
                    self.i += 1;
                    fields.push((key, self.value()));
                    self.ws();
                    if self.s[self.i] == b',' {
                        self.i += 1;
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.s[self.i] == b']' {
                        self.i += 1;
                        return Json::Arr(items);
                    }
                    items.push(self.value());
                    self.ws();
                    if self.s[self.i] == b',' {
                        self.i += 1;
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                Json::Num(String::from_utf8(self.s[start..self.i].to_vec()).unwrap())
            }
        }
    }

    fn word(&mut self, w: &str, v: Json) -> Json {
        assert!(self.s[self.i..].starts_with(w.as_bytes()));
        self.i += w.len();
        v
    }

    fn string(&mut self) -> String {
        assert_eq!(self.s[self.i], b'"');
        let start = self.i;
        self.i += 1;
        while self.s[self.i] != b'"' {
            self.i += if self.s[self.i] == b'\\' { 2 } else { 1 };
        }
        self.i += 1;
        serde_json::from_slice(&self.s[start..self.i]).unwrap()
    }
}

/// Keys whose values differ from run to run: compared by kind only.
const VOLATILE: &[&str] = &[
    "execution_id",
    "timestamp",
    "last_at",
    "uptime_seconds",
    "connections_open",
    "connections_total",
    "requests_total",
    "last_accept_at",
    "last_request_at",
    "last_request_completed_at",
];

fn same_kind(a: &Json, b: &Json) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// `example` as the README prints it against `actual` as the server sent
/// it. With `shortened`, the example may leave keys out (in order).
fn compare(path: &str, example: &Json, actual: &Json, shortened: bool, volatile: bool) {
    match (example, actual) {
        (Json::Obj(ex), Json::Obj(ac)) => {
            let ex_keys: Vec<&str> = ex.iter().map(|(k, _)| k.as_str()).collect();
            let ac_keys: Vec<&str> = ac.iter().map(|(k, _)| k.as_str()).collect();
            if shortened {
                let mut rest = ac_keys.iter();
                for k in &ex_keys {
                    assert!(
                        rest.any(|a| a == k),
                        "{path}: README key {k:?} is missing or out of the server's order {ac_keys:?}"
                    );
                }
            } else {
                assert_eq!(
                    ex_keys, ac_keys,
                    "{path}: the README's keys differ from the server's"
                );
            }
            for (k, v) in ex {
                let (_, a) = ac.iter().find(|(ak, _)| ak == k).unwrap();
                compare(
                    &format!("{path}.{k}"),
                    v,
                    a,
                    shortened,
                    volatile || VOLATILE.contains(&k.as_str()),
                );
            }
        }
        (Json::Arr(ex), Json::Arr(ac)) => {
            assert_eq!(ex.len(), ac.len(), "{path}: array length");
            for (i, (e, a)) in ex.iter().zip(ac).enumerate() {
                compare(&format!("{path}[{i}]"), e, a, shortened, volatile);
            }
        }
        (e, a) if volatile => assert!(
            same_kind(e, a),
            "{path}: README shows {e:?}, the server sent {a:?}"
        ),
        (Json::Num(e), Json::Num(a)) => assert_eq!(e, a, "{path}"),
        (Json::Str(e), Json::Str(a)) => assert_eq!(e, a, "{path}"),
        (Json::Bool(e), Json::Bool(a)) => assert_eq!(e, a, "{path}"),
        (Json::Null, Json::Null) => {}
        (e, a) => panic!("{path}: README shows {e:?}, the server sent {a:?}"),
    }
}

/// One `$ curl …` of the README and the answer printed under it.
struct Example {
    method: String,
    path: String,
    body: Option<String>,
    /// The `-H` header, else what curl sends with `-d`.
    content_type: Option<String>,
    shortened: bool,
    answer: String,
}

/// Split a shell line into words (single and double quotes, no escapes
/// beyond what the README uses).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (_, c) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn examples() -> Vec<Example> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("## A first session")
        .nth(1)
        .expect("README has \"A first session\"");
    let block = section
        .split("```console")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a console block");
    let mut lines = block.lines().peekable();
    let mut out = Vec::new();
    while let Some(line) = lines.next() {
        let Some(cmd) = line.strip_prefix("$ ") else {
            continue;
        };
        let mut cmd = cmd.to_owned();
        while cmd.trim_end().ends_with('\\') {
            cmd = cmd.trim_end().trim_end_matches('\\').to_owned() + " " + lines.next().unwrap();
        }
        let shortened = cmd.contains("# shortened");
        let cmd = cmd.split(" #").next().unwrap();
        let w = words(cmd);
        assert_eq!(w[0], "curl", "{cmd}");
        let mut body = None;
        let mut url = None;
        let mut content_type = None;
        let mut i = 1;
        while i < w.len() {
            match w[i].as_str() {
                "-s" => {}
                "-H" => {
                    i += 1;
                    let (name, value) = w[i].split_once(':').expect("a header");
                    assert!(name.eq_ignore_ascii_case("content-type"), "{cmd}");
                    content_type = Some(value.trim().to_owned());
                }
                "-d" => {
                    i += 1;
                    body = Some(w[i].clone());
                }
                other => url = Some(other.to_owned()),
            }
            i += 1;
        }
        let url = url.expect("a URL");
        let path = url
            .strip_prefix("localhost:8420")
            .expect("the URL the README's server listens on")
            .to_owned();
        let answer = lines
            .next()
            .expect("an answer under the command")
            .to_owned();
        if body.is_some() && content_type.is_none() {
            content_type = Some("application/x-www-form-urlencoded".into());
        }
        out.push(Example {
            method: if body.is_some() { "POST" } else { "GET" }.into(),
            path,
            body,
            content_type,
            shortened,
            answer,
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_session_in_the_readme_is_what_the_server_answers() {
    let examples = examples();
    assert!(examples.len() >= 4, "{} examples", examples.len());
    let dir = tempfile::tempdir().unwrap();
    // The embedded defaults, as `cargo run --release -- serve` starts.
    let d = Daemon::start(&[], dir.path());
    for ex in &examples {
        let headers: Vec<(&str, &str)> = ex
            .content_type
            .iter()
            .map(|t| ("content-type", t.as_str()))
            .collect();
        let r = request(
            d.addr,
            &ex.method,
            &ex.path,
            &headers,
            ex.body.clone().unwrap_or_default(),
        )
        .await;
        let sent = r.text();
        compare(
            &format!("{} {}", ex.method, ex.path),
            &parse(&ex.answer),
            &parse(&sent),
            ex.shortened,
            false,
        );
    }
}
