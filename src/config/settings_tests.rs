//! The list of settings against the README's settings tables, the loader
//! and `--help`.

use super::settings::*;
use super::*;
use crate::config::Overrides;

/// One row of a README settings table (`| env var | TOML key | default |
/// meaning |`), as written.
#[derive(Debug)]
struct Row {
    line: usize,
    env: String,
    alias: Option<String>,
    flag: Option<String>,
    key: Option<String>,
    default: String,
}

const TABLE_HEAD: &str = "| env var | TOML key | default | meaning |";

/// The words between backticks in `cell`.
fn quoted(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every row of every settings table in the README.
fn readme_rows() -> Vec<Row> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut rows = Vec::new();
    for (head, _) in lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == TABLE_HEAD)
    {
        // The head, its separator, then rows until the table ends.
        for (i, line) in lines.iter().enumerate().skip(head + 2) {
            if !line.starts_with('|') {
                break;
            }
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            let names = quoted(cells[0]);
            let flag = names.iter().find(|n| n.starts_with("--")).cloned();
            let alias = cells[0]
                .contains("alias")
                .then(|| names.last().cloned())
                .flatten();
            rows.push(Row {
                line: i + 1,
                env: names.first().cloned().unwrap_or_default(),
                alias,
                flag,
                key: quoted(cells[1]).first().cloned(),
                default: cells[2].replace('`', ""),
            });
        }
    }
    rows
}

#[test]
fn readme_settings_tables_and_the_list_agree() {
    let rows = readme_rows();
    assert!(
        rows.len() > 40,
        "the README's tables were not found: {rows:?}"
    );
    let mut problems = Vec::new();
    for row in &rows {
        let Some(s) = SETTINGS.iter().find(|s| s.env == row.env) else {
            problems.push(format!(
                "README line {}: {} is not in the list",
                row.line, row.env
            ));
            continue;
        };
        let key = s.toml.then_some(s.name);
        let pairs = [
            ("TOML key", row.key.as_deref(), key),
            ("default", Some(row.default.as_str()), Some(s.shown())),
            ("flag", row.flag.as_deref(), s.flag),
            ("alias", row.alias.as_deref(), s.alias),
        ];
        for (what, readme, list) in pairs {
            if readme != list {
                problems.push(format!(
                    "README line {}: {} {what} is {readme:?} there, {list:?} in the list",
                    row.line, row.env
                ));
            }
        }
    }
    for s in SETTINGS {
        match rows.iter().filter(|r| r.env == s.env).count() {
            1 => {}
            n => problems.push(format!("{} has {n} rows in the README", s.env)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn names_and_variables_are_unique_and_defaults_load() {
    for (i, s) in SETTINGS.iter().enumerate() {
        for t in &SETTINGS[i + 1..] {
            assert!(
                s.name != t.name && s.env != t.env,
                "{} / {}",
                s.name,
                t.name
            );
        }
    }
    let c = Config::load(Overrides::default(), |_| None).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn every_word_of_a_choice_is_accepted_and_others_are_not() {
    for s in SETTINGS {
        let Parse::Choice { words, aliases, .. } = s.parse else {
            continue;
        };
        let accepted = words.iter().chain(aliases.iter().map(|(a, _)| a));
        for word in accepted {
            let vars = [
                (s.env, *word),
                ("AGENTD_ACP_CMD", "agent"),
                ("AGENTD_RUNTIME_CMD", "cat"),
            ];
            let c = Config::load(Overrides::default(), |k| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            });
            assert!(c.is_ok(), "{}={word}: {:?}", s.env, c.err());
        }
        let err = Config::load(Overrides::default(), |k| {
            (k == s.env).then(|| "no-such-word".to_owned())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(s.env) && err.contains("no-such-word"), "{err}");
        assert!(err.contains(words[0]), "the words are listed: {err}");
    }
}

#[test]
fn help_lists_every_setting_with_its_variable_key_and_default() {
    let help = help();
    for s in SETTINGS {
        let at = help
            .find(&format!("\n  {}", s.env))
            .unwrap_or_else(|| panic!("{} is missing:\n{help}", s.env));
        let entry = &help[at..];
        let entry = &entry[..entry[1..].find("\n\n").map_or(entry.len(), |e| e + 1)];
        assert!(entry.contains(s.meaning), "{entry}");
        assert!(
            entry.contains(&format!("default: {}", s.shown())),
            "{entry}"
        );
        assert_eq!(
            entry.contains(&format!("TOML {}", s.name)),
            s.toml,
            "{entry}"
        );
    }
    assert!(help.contains("an integer from 1 to 1048576"), "{help}");
}

#[test]
fn bounds_are_written_in_units_the_settings_accept() {
    assert_eq!(fmt_duration(Duration::ZERO), "0ms");
    assert_eq!(fmt_duration(ms(1500)), "1500ms");
    assert_eq!(fmt_duration(secs(90)), "90s");
    assert_eq!(fmt_duration(secs(300)), "5m");
    assert_eq!(fmt_duration(secs(7 * DAY)), "168h");
    assert_eq!(fmt_bytes(1), "1");
    assert_eq!(fmt_bytes(1024), "1KiB");
    assert_eq!(fmt_bytes(1 << 40), "1024GiB");
    for text in ["0ms", "1500ms", "90s", "5m", "168h"] {
        assert!(crate::config::parse_duration(text).is_some(), "{text}");
    }
}
