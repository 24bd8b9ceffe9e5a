//! The nginx, Caddy and HAProxy configurations of docs/deploy.md and docs/scale-out.md (several
//! relays behind one balancer), checked by the programs themselves: `nginx -t`,
//! `caddy validate`, `haproxy -c`; and the Caddyfile of the compose example (docs/docker/), the
//! same as deploy.md's but for the relay's address.
//!
//! Each checked block follows a `<!-- deploy-test: NAME -->` line in its page, and every
//! nginx, Caddy and HAProxy block of the pages must carry one, so that none escapes. Only what
//! cannot exist on a test machine is replaced: the Let's Encrypt certificate files (by a
//! certificate the test generates) and, for nginx, the pid, log and temporary paths of the main
//! configuration that Debian provides around a site file.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ptth_tests::fronts::{HAPROXY_BALANCING, NGINX_BALANCING, Pki, ensure_installed};
use ptth_tests::within;

const DEPLOY_MD: &str = include_str!("../../docs/deploy.md");
const SCALE_OUT_MD: &str = include_str!("../../docs/scale-out.md");
/// The pages whose front configurations are checked, and the names of their marked blocks.
const PAGES: &[(&str, &str, &[&str])] = &[
    (
        "docs/deploy.md",
        DEPLOY_MD,
        &["nginx-site", "nginx-main", "caddy", "haproxy"],
    ),
    (
        "docs/scale-out.md",
        SCALE_OUT_MD,
        &["haproxy-cluster", "nginx-cluster"],
    ),
];
/// The Caddyfile of the compose example of docs/deploy.md ("Containers").
const COMPOSE_CADDYFILE: &str = include_str!("../../docs/docker/Caddyfile");
const LIMIT: Duration = Duration::from_secs(60);
/// The fenced code languages that hold a front's configuration.
const FRONT_LANGS: &[&str] = &["nginx", "caddy", "caddyfile", "haproxy"];

/// A marked code block of a page.
#[derive(Debug)]
struct Block {
    name: String,
    lang: String,
    text: String,
    /// 1-based line of its opening fence.
    line: usize,
}

/// The blocks of `page` that follow a `<!-- deploy-test: NAME -->` line.
fn marked_blocks(page: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = page.lines().enumerate();
    while let Some((_, line)) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- deploy-test:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        let (i, fence) = lines.next().expect("a code block after the marker");
        let lang = fence
            .trim()
            .strip_prefix("```")
            .unwrap_or_else(|| panic!("line {}: the marker must precede a fence", i + 1));
        let mut text = String::new();
        for (_, l) in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            text.push_str(l);
            text.push('\n');
        }
        out.push(Block {
            name: name.trim().to_owned(),
            lang: lang.trim().to_owned(),
            text,
            line: i + 1,
        });
    }
    out
}

/// Opening-fence lines (1-based) of every block of `page` in a front's language.
fn front_fences(page: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut inside = false;
    for (i, line) in page.lines().enumerate() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        if !inside && FRONT_LANGS.contains(&info.trim()) {
            out.push(i + 1);
        }
        inside = !inside;
    }
    out
}

/// The block marked `name`, in whichever page.
fn block(name: &str) -> Block {
    PAGES
        .iter()
        .flat_map(|(_, page, _)| marked_blocks(page))
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no block marked {name}"))
}

/// Replaces the argument of every `directive <argument>;` line (nginx syntax), keeping the
/// indentation; returns how many lines were changed.
fn set_directive(text: &mut String, directive: &str, value: &str) -> usize {
    let mut n = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let indent = &l[..l.len() - l.trim_start().len()];
            match l.split_whitespace().next() {
                Some(d) if d == directive => {
                    n += 1;
                    format!("{indent}{directive} {value};")
                }
                _ => l.to_owned(),
            }
        })
        .collect();
    *text = lines.join("\n") + "\n";
    n
}

/// Runs a checker; returns its exit success and everything it printed.
async fn check(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} hung", program.display()))
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_front_configuration_block_is_marked() {
    for (file, page, want) in PAGES {
        let marked = marked_blocks(page);
        assert!(!marked.is_empty(), "no marked block in {file}");
        let names: BTreeSet<&str> = marked.iter().map(|b| b.name.as_str()).collect();
        let want: BTreeSet<&str> = want.iter().copied().collect();
        assert_eq!(names, want, "marked blocks of {file}");
        assert_eq!(names.len(), marked.len(), "a name is used twice in {file}");
        for b in &marked {
            assert!(
                FRONT_LANGS.contains(&b.lang.as_str()),
                "{file} line {}: block {} is in {:?}",
                b.line,
                b.name,
                b.lang
            );
            assert!(
                b.text.lines().any(|l| {
                    let l = l.trim();
                    !l.is_empty() && !l.starts_with('#')
                }),
                "{file} line {}: block {} is empty",
                b.line,
                b.name
            );
        }
        let fences = front_fences(page);
        let marked_lines: Vec<usize> = marked.iter().map(|b| b.line).collect();
        assert_eq!(
            fences, marked_lines,
            "every nginx, Caddy and HAProxy block of {file} must follow a deploy-test marker"
        );
    }
    // No name in two pages either.
    let all: Vec<String> = PAGES
        .iter()
        .flat_map(|(_, page, _)| marked_blocks(page))
        .map(|b| b.name)
        .collect();
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a block name is used in two pages");
}

/// The balancing lines of docs/scale-out.md are those the tests run (`tests/src/fronts/`).
#[test]
fn the_documented_balancing_is_the_tested_one() {
    for (name, want) in [
        ("haproxy-cluster", HAPROXY_BALANCING),
        ("nginx-cluster", NGINX_BALANCING.as_slice()),
    ] {
        let text = block(name).text;
        for line in want {
            assert!(
                text.lines().any(|l| l.trim() == *line),
                "docs/scale-out.md, block {name}, lacks `{line}`"
            );
        }
    }
}

#[tokio::test]
async fn nginx_accepts_the_documented_configuration() {
    within(LIMIT * 2, nginx_accepts_site("nginx-site")).await;
}

#[tokio::test]
async fn nginx_accepts_the_documented_cluster() {
    within(LIMIT * 2, nginx_accepts_site("nginx-cluster")).await;
}

/// `nginx -t` accepts the site file of the block marked `name` (in deploy.md's main
/// configuration), without a warning.
async fn nginx_accepts_site(name: &str) {
    let nginx = ensure_installed("nginx", "nginx").expect("nginx");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = Pki::generate(d).expect("pki");

    let mut site = block(name).text;
    let cert = pki.cert.display().to_string();
    let key = pki.key.display().to_string();
    assert!(set_directive(&mut site, "ssl_certificate", &cert) > 0);
    assert!(set_directive(&mut site, "ssl_certificate_key", &key) > 0);
    // Debian's nginx.conf around it: the page's top-level lines, then an http block
    // including the site, with files in the test folder instead of /var.
    let main = block("nginx-main").text;
    let p = d.display();
    let conf = format!(
        "{main}\npid {p}/nginx.pid;\nerror_log {p}/error.log;\nhttp {{\n\
         access_log {p}/access.log;\nclient_body_temp_path {p}/body;\nproxy_temp_path {p}/proxy;\n\
         fastcgi_temp_path {p}/fastcgi;\nuwsgi_temp_path {p}/uwsgi;\nscgi_temp_path {p}/scgi;\n\
         {site}}}\n"
    );
    let path = d.join("nginx.conf");
    std::fs::write(&path, &conf).expect("write");
    let (path, prefix, err) = (
        path.display().to_string(),
        p.to_string(),
        d.join("error.log").display().to_string(),
    );
    let (ok, out) = check(&nginx, &["-t", "-c", &path, "-p", &prefix, "-e", &err], &[]).await;
    assert!(ok, "nginx -t failed:\n{out}\n{conf}");
    assert!(out.contains("test is successful"), "{out}");
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("[warn]") || l.contains("[emerg]") || l.contains("[alert]"))
        .collect();
    assert!(warnings.is_empty(), "nginx -t warned:\n{out}");
}

#[tokio::test]
async fn caddy_accepts_the_documented_configuration() {
    within(LIMIT * 2, caddy_validates(block("caddy").text)).await;
}

#[tokio::test]
async fn caddy_accepts_the_compose_example() {
    within(LIMIT * 2, caddy_validates(COMPOSE_CADDYFILE.to_owned())).await;
}

/// The Caddyfile of the compose example is the one of the page but for the relay's address
/// (its service name on the compose network) and the comments.
#[test]
fn the_compose_caddyfile_is_the_documented_one() {
    let settings = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    let documented = block("caddy")
        .text
        .replace("reverse_proxy 127.0.0.1:4000", "reverse_proxy relay:4000");
    assert_eq!(settings(COMPOSE_CADDYFILE), settings(&documented));
}

/// `caddy validate` accepts the Caddyfile `text`, without a warning.
async fn caddy_validates(text: String) {
    let caddy = ensure_installed("caddy", "caddy").expect("caddy");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let path = d.join("Caddyfile");
    std::fs::write(&path, text).expect("write");
    let path = path.display().to_string();
    let (data, config) = (d.join("data"), d.join("config"));
    let (ok, out) = check(
        &caddy,
        &["validate", "--config", &path, "--adapter", "caddyfile"],
        &[
            ("HOME", d),
            ("XDG_DATA_HOME", &data),
            ("XDG_CONFIG_HOME", &config),
        ],
    )
    .await;
    assert!(ok, "caddy validate failed:\n{out}");
    assert!(out.contains("Valid configuration"), "{out}");
    // Also "Caddyfile input is not formatted", which `caddy fmt` would fix.
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("\"level\":\"warn\"") || l.contains("\"level\":\"error\""))
        .collect();
    assert!(warnings.is_empty(), "caddy validate warned:\n{out}");
}

#[tokio::test]
async fn haproxy_accepts_the_documented_configuration() {
    within(LIMIT * 2, haproxy_accepts("haproxy")).await;
}

#[tokio::test]
async fn haproxy_accepts_the_documented_cluster() {
    within(LIMIT * 2, haproxy_accepts("haproxy-cluster")).await;
}

/// `haproxy -c` accepts the configuration of the block marked `name`, without a warning.
async fn haproxy_accepts(name: &str) {
    let haproxy = ensure_installed("haproxy", "haproxy").expect("haproxy");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = Pki::generate(d).expect("pki");
    let combined = pki.combined.display().to_string();
    // `crt <file>` on the bind lines: the test certificate and key, in one file as HAProxy
    // wants them.
    let mut replaced = 0;
    let cfg: String = block(name)
        .text
        .lines()
        .map(|l| {
            let mut tokens: Vec<&str> = l.split_whitespace().collect();
            if tokens.first() == Some(&"bind")
                && let Some(i) = tokens.iter().position(|t| *t == "crt")
                && i + 1 < tokens.len()
            {
                tokens[i + 1] = &combined;
                replaced += 1;
                format!("    {}\n", tokens.join(" "))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(replaced > 0, "no `bind ... crt <file>` line");
    let path = d.join("haproxy.cfg");
    std::fs::write(&path, &cfg).expect("write");
    let path = path.display().to_string();
    let (ok, out) = check(&haproxy, &["-c", "-f", &path], &[]).await;
    assert!(ok, "haproxy -c failed:\n{out}\n{cfg}");
    assert!(out.contains("Configuration file is valid"), "{out}");
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("[WARNING]") || l.contains("[ALERT]"))
        .collect();
    assert!(warnings.is_empty(), "haproxy -c warned:\n{out}");
}
