//! Repository rules checked as tests: `//!` headers, the storage-engine and wire-format boundaries,
//! and a README configuration table that lists every setting.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 10, "found the sources");
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let missing: Vec<String> = src_files()
        .into_iter()
        .filter(|(_, text)| !text.starts_with("//!"))
        .map(|(path, _)| path)
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! first line: {missing:?}"
    );
}

#[test]
fn only_the_store_touches_the_storage_engine() {
    let offenders: Vec<String> = src_files()
        .into_iter()
        .filter(|(path, _)| !path.starts_with("src/store/"))
        .filter(|(_, text)| {
            text.lines()
                .any(|l| l.contains("sled::") || l.trim_start().starts_with("use sled"))
        })
        .map(|(path, _)| path)
        .collect();
    assert!(
        offenders.is_empty(),
        "sled used outside src/store: {offenders:?}"
    );
}

#[test]
fn only_transports_know_platform_wire_formats() {
    let wire = [
        "slack_morphism",
        "serenity::",
        "X-Slack-Signature",
        "X-Signature-Ed25519",
    ];
    let offenders: Vec<String> = src_files()
        .into_iter()
        .filter(|(path, _)| !path.starts_with("src/transport/"))
        .filter(|(_, text)| wire.iter().any(|w| text.contains(w)))
        .map(|(path, _)| path)
        .collect();
    assert!(
        offenders.is_empty(),
        "platform wire formats outside src/transport: {offenders:?}"
    );
}

#[test]
fn the_tenant_context_has_no_public_constructor_and_is_not_serialisable() {
    let (_, text) = src_files()
        .into_iter()
        .find(|(p, _)| p == "src/tenant/context.rs")
        .expect("the context lives in src/tenant/context.rs");
    let decl = text.find("pub struct TenantContext").expect("declared");
    let derive_line = text[..decl].lines().last().unwrap_or_default();
    assert!(
        !derive_line.contains("Serialize") && !derive_line.contains("Deserialize"),
        "{derive_line}"
    );
    assert!(
        text.contains("pub(super) fn from_parts"),
        "the constructor stays private to the tenant module"
    );
    let body_start = decl + text[decl..].find('{').unwrap();
    let body_end = body_start + text[body_start..].find('}').unwrap();
    assert!(
        !text[body_start..body_end].contains("pub "),
        "fields stay private"
    );
}

#[test]
fn the_readme_lists_every_setting() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut names = Vec::new();
    for (_, text) in src_files() {
        // clap settings: `env = "…"` inside an `#[arg(…)]`, on its own line or on the attribute's line.
        let settings = text.lines().filter(|l| {
            l.trim_start().starts_with("env = \"")
                || (l.contains("#[arg(") && l.contains(", env = \""))
        });
        for line in settings {
            for part in line.split("env = \"").skip(1) {
                names.push(part.split('"').next().unwrap().to_owned());
            }
        }
    }
    assert!(
        names.contains(&"AGENTGATE_DATA_DIR".to_owned()),
        "{names:?}"
    );
    for name in &names {
        assert!(
            name == "PORT" || name.starts_with("AGENTGATE_"),
            "setting {name} is not named AGENTGATE_*"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "README's configuration table lacks `{name}`"
        );
    }
}
