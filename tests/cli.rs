//! The `agentgate` binary end to end: `serve` on port 0 with SIGTERM, `installations …`, `tenants list`, `--help`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentgate");

fn agentgate(data: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("AGENTGATE_DATA_DIR", data)
        .env("AGENTGATE_MASTER_KEY", "17".repeat(32))
        .env("AGENTGATE_LOG", "info");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the binary runs");
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn write_manifest(dir: &Path, team: &str, token_var: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{team}.toml"));
    std::fs::write(
        &path,
        format!(
            "[tenant]\nname = \"{team}-co\"\n[[installation]]\nplatform = \"slack\"\nteam_id = \"{team}\"\napp_id = \"A1\"\nbot_token_env = \"{token_var}\"\ninstaller = \"U1\"\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn import_list_and_revoke_never_print_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifest = write_manifest(dir.path(), "T0CLI", "CLI_TEST_TOKEN");
    let secret = "xoxb-cli-secret-4411";

    let out = run_ok(
        agentgate(&data)
            .env("CLI_TEST_TOKEN", secret)
            .args(["installations", "import"])
            .arg(&manifest),
    );
    assert!(out.contains("TenantCreated"), "{out}");
    // Importing again changes nothing.
    let out = run_ok(
        agentgate(&data)
            .env("CLI_TEST_TOKEN", secret)
            .args(["installations", "import"])
            .arg(&manifest),
    );
    assert!(out.contains("Unchanged"), "{out}");

    let json = run_ok(agentgate(&data).args(["tenants", "list", "--json"]));
    assert!(!json.contains(secret), "tokens never print");
    let tenants: serde_json::Value = serde_json::from_str(&json).unwrap();
    let arr = tenants.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    assert_eq!(arr[0]["name"], "T0CLI-co");
    assert!(arr[0]["id"].as_str().unwrap().starts_with("t_"));
    let insts = arr[0]["installations"].as_array().unwrap();
    assert_eq!(insts.len(), 1);
    assert_eq!(insts[0]["workspace"], "slack:team:T0CLI");
    assert_eq!(insts[0]["status"], "active");
    assert_eq!(insts[0]["has_bot_token"], true);
    let id = insts[0]["id"].as_str().unwrap().to_owned();

    let listed = run_ok(agentgate(&data).args(["installations", "list"]));
    assert!(
        listed.contains(&id) && listed.contains("active") && !listed.contains(secret),
        "{listed}"
    );

    let out = run_ok(agentgate(&data).args(["installations", "revoke", &id]));
    assert!(out.contains("revoked"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&run_ok(agentgate(&data).args([
        "installations",
        "list",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json[0]["status"], "revoked");
    assert_eq!(json[0]["has_bot_token"], false);
}

#[test]
fn bad_input_gets_a_clear_error_and_a_failing_exit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let check = |args: &[&str], needle: &str| {
        let out = agentgate(&data).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    check(
        &["installations", "revoke", "nonsense"],
        "not an installation id",
    );
    check(
        &["installations", "revoke", "i_01HZY3J5K6M7N8P9Q0R1S2T3V4"],
        "not found",
    );
    check(
        &["installations", "import", "/no/such/file.toml"],
        "/no/such/file.toml",
    );
    // Lifetimes too large for a duration, or for a date, are refused rather than a panic.
    for expires in ["9999999999999999d", "99999999999d"] {
        check(
            &[
                "keys",
                "create",
                "--tenant",
                "t_01HZY3J5K6M7N8P9Q0R1S2T3V4",
                "--role",
                "admin",
                "--name",
                "x",
                "--expires",
                expires,
            ],
            "too far away",
        );
    }
    let bad = dir.path().join("inline.toml");
    std::fs::write(&bad, "[tenant]\nname=\"x\"\n[[installation]]\nplatform=\"slack\"\nteam_id=\"T1\"\napp_id=\"A\"\ninstaller=\"U1\"\nbot_token=\"xoxb-1\"\n").unwrap();
    check(
        &["installations", "import", bad.to_str().unwrap()],
        "inline",
    );
    let out = agentgate(&data)
        .env("AGENTGATE_MASTER_KEY", "short")
        .args(["tenants", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 bytes"));
    // A zero timeout would answer every request 408: refused before anything starts.
    let mut serve = agentgate(&data)
        .env("AGENTGATE_REQUEST_TIMEOUT_SECS", "0")
        .env("AGENTGATE_BIND", "127.0.0.1")
        .env("PORT", "0")
        .args(["serve"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            serve.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = serve.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("request-timeout-secs"), "{err}");
}

#[test]
fn help_documents_every_setting_without_showing_secret_values() {
    let out = Command::new(BIN)
        .env("AGENTGATE_MASTER_KEY", "a-secret-value-that-must-not-print")
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "AGENTGATE_DATA_DIR",
        "AGENTGATE_MASTER_KEY",
        "AGENTGATE_LOG_FORMAT",
        "AGENTGATE_LOG",
        "PORT",
        "AGENTGATE_BIND",
        "AGENTGATE_INSTALLATIONS_DIR",
        "AGENTGATE_REQUEST_TIMEOUT_SECS",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    assert!(
        !help.contains("a-secret-value-that-must-not-print"),
        "{help}"
    );
}

#[test]
fn serve_on_port_zero_answers_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let installations = Path::new(env!("CARGO_MANIFEST_DIR")).join("installations");
    let mut child = Command::new(BIN)
        .env_clear()
        .env("AGENTGATE_DATA_DIR", &data)
        .env("AGENTGATE_INSTALLATIONS_DIR", &installations)
        .env("AGENTGATE_BIND", "127.0.0.1")
        .env("PORT", "0")
        .env("AGENTGATE_LOG", "info")
        .arg("serve")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut port = None;
    let mut lines = Vec::new();
    while port.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(rest) = line.split("addr=127.0.0.1:").nth(1) {
                port = rest
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<u16>().ok());
            }
            lines.push(line);
        }
    }
    let port = port.unwrap_or_else(|| panic!("no listening line in:\n{}", lines.join("\n")));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("AGENTGATE_MASTER_KEY is not set")),
        "a development key file is announced: {lines:?}"
    );

    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "serve exits 0 after SIGTERM: {exit:?}");

    let key = data.join("master.key");
    assert!(key.is_file(), "the development key file was generated");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert!(data.join("store").is_dir());
}

#[test]
fn audit_export_verify_proof_and_replay_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifest = write_manifest(dir.path(), "T0AUD", "UNSET_VAR_FOR_AUDIT");
    run_ok(
        agentgate(&data)
            .args(["installations", "import"])
            .arg(&manifest),
    );
    let tenants: serde_json::Value = serde_json::from_str(&run_ok(
        agentgate(&data).args(["tenants", "list", "--json"]),
    ))
    .unwrap();
    let tenant = tenants[0]["id"].as_str().unwrap().to_owned();

    // 3 provisioning events and the checkpoint record the import signed on close: 4 events.
    // Keys: a generated signer and its verifier key for auditors.
    let key_file = dir.path().join("signer.key");
    let vkey = run_ok(
        agentgate(&data)
            .args(["audit", "keygen", "--name", "audit-test", "--out"])
            .arg(&key_file),
    );
    let vkey = vkey.trim().to_owned();
    assert!(vkey.starts_with("audit-test+"), "{vkey}");
    let with_key = |cmd: &mut Command| {
        cmd.env("AGENTGATE_AUDIT_SIGNING_KEY_FILE", &key_file);
    };

    let out1 = dir.path().join("bundle1");
    let mut cmd = agentgate(&data);
    with_key(&mut cmd);
    let said = run_ok(
        cmd.args(["audit", "export", "--tenant", &tenant, "--out"])
            .arg(&out1),
    );
    assert!(said.contains("exported events 0.."), "{said}");

    let verify = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["audit", "verify"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let b1 = out1.to_str().unwrap();
    let (code, text) = verify(&[b1, "--trusted-key", &vkey]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with(&format!(
            "verified: 4 events (seq 0 to 3 of 5 in the log), tenant {tenant}, root "
        )),
        "{text}"
    );
    assert!(text.contains("signed by audit-test+"), "{text}");

    // A key file works as --trusted-key too; a different key fails with exit 1; garbage exits 2.
    let vkey_file = dir.path().join("v.pub");
    std::fs::write(&vkey_file, &vkey).unwrap();
    assert_eq!(
        verify(&[b1, "--trusted-key", vkey_file.to_str().unwrap()]).0,
        Some(0)
    );
    let other = run_ok(
        agentgate(&data)
            .args(["audit", "keygen", "--name", "other", "--out"])
            .arg(dir.path().join("o.key")),
    );
    let (code, text) = verify(&[b1, "--trusted-key", other.trim()]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.starts_with("FAILED: checkpoint.txt"), "{text}");
    assert_eq!(verify(&[b1, "--trusted-key", "not-a-key"]).0, Some(2));
    assert_eq!(
        verify(&[b1, "--since-checkpoint", "/no/such/file"]).0,
        Some(2)
    );
    // Could not run, not a failed bundle: no bundle there; a key file that holds no key (named as
    // such, not parsed as if its path were the key).
    let stderr_of = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["audit", "verify"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = dir.path().join("no-such-bundle");
    let (code, err) = stderr_of(&[missing.to_str().unwrap(), "--trusted-key", &vkey]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read the bundle"), "{err}");
    let (code, err) = stderr_of(&[vkey_file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not a directory"), "{err}");
    let bad_key_file = dir.path().join("bad.pub");
    std::fs::write(&bad_key_file, "not a key\n").unwrap();
    let bad = bad_key_file.to_str().unwrap();
    let (code, err) = stderr_of(&[b1, "--trusted-key", bad]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("the file {bad} does not hold a verifier key")),
        "{err}"
    );
    // Unreadable as text: before, its path was parsed as the key instead.
    std::fs::write(&bad_key_file, b"\xff\xfe key").unwrap();
    let (code, err) = stderr_of(&[b1, "--trusted-key", bad]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--trusted-key: cannot read the file {bad}")),
        "{err}"
    );
    let (code, err) = stderr_of(&[b1, "--trusted-key", "not-a-key"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("neither a verifier key nor an existing file"),
        "{err}"
    );

    // More events, then an incremental export proven consistent with the first.
    run_ok(
        agentgate(&data)
            .args(["installations", "import"])
            .arg(write_manifest(
                dir.path(),
                "T0AUDTWO",
                "UNSET_VAR_FOR_AUDIT",
            )),
    );
    let out2 = dir.path().join("bundle2");
    let since = out1.join("checkpoint.txt");
    let mut cmd = agentgate(&data);
    with_key(&mut cmd);
    run_ok(
        cmd.args(["audit", "export", "--tenant", &tenant, "--since-checkpoint"])
            .arg(&since)
            .arg("--out")
            .arg(&out2),
    );
    let (code, text) = verify(&[
        out2.to_str().unwrap(),
        "--trusted-key",
        &vkey,
        "--since-checkpoint",
        since.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("consistent with the earlier checkpoint"),
        "{text}"
    );

    // Exporting into a non-empty directory is refused.
    let out = agentgate(&data)
        .args(["audit", "export", "--tenant", &tenant, "--out"])
        .arg(&out1)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // A tampered bundle fails with exit 1 and names the file.
    let events = out1.join("events.jsonl");
    let text = std::fs::read_to_string(&events)
        .unwrap()
        .replacen("T0AUD-co", "T0AUX-co", 1);
    std::fs::write(&events, text).unwrap();
    let (code, text) = verify(&[b1]);
    assert_eq!(code, Some(1));
    assert!(text.starts_with("FAILED: events.jsonl"), "{text}");

    // Proof of one event, in the tlog-proof format.
    let mut cmd = agentgate(&data);
    with_key(&mut cmd);
    let proof = run_ok(cmd.args(["audit", "proof", "--tenant", &tenant, "--seq", "1"]));
    assert!(
        proof.starts_with("c2sp.org/tlog-proof@v1\nindex 1\n"),
        "{proof}"
    );
    assert!(proof.contains(&format!("agentgate/{tenant}\n")), "{proof}");

    // Replay agrees with the live projections.
    let mut cmd = agentgate(&data);
    with_key(&mut cmd);
    let said = run_ok(cmd.args(["audit", "replay", "--tenant", &tenant]));
    assert!(said.starts_with("no difference"), "{said}");

    let out = agentgate(&data)
        .args(["audit", "export", "--tenant", "t_nonsense", "--out"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a tenant id"));

    // A bare name is a directory in the current one (its parent reads as "", which the export
    // once tried to sync as a path after the bundle was in place, and failed).
    let mut cmd = agentgate(&data);
    with_key(&mut cmd);
    let said = run_ok(
        cmd.current_dir(dir.path())
            .args(["audit", "export", "--tenant", &tenant, "--out", "bare"]),
    );
    assert!(said.contains("exported events 0.."), "{said}");
    let bare = dir.path().join("bare");
    assert_eq!(
        verify(&[bare.to_str().unwrap(), "--trusted-key", &vkey]).0,
        Some(0)
    );
}

#[test]
fn keys_are_created_listed_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifest = write_manifest(dir.path(), "T0KEYS", "UNSET_VAR_FOR_KEYS");
    run_ok(
        agentgate(&data)
            .args(["installations", "import"])
            .arg(&manifest),
    );
    let tenants: serde_json::Value = serde_json::from_str(&run_ok(
        agentgate(&data).args(["tenants", "list", "--json"]),
    ))
    .unwrap();
    let tenant = tenants[0]["id"].as_str().unwrap().to_owned();

    let token = run_ok(agentgate(&data).args([
        "keys",
        "create",
        "--tenant",
        &tenant,
        "--role",
        "compliance",
        "--expires",
        "30d",
        "--name",
        "auditor",
    ]));
    let token = token.trim();
    assert!(
        token.starts_with("agk_") && token.len() == 4 + 26 + 1 + 64,
        "{token}"
    );
    let id = &token[4..30];
    let listed = run_ok(agentgate(&data).args(["keys", "list", "--tenant", &tenant]));
    assert!(
        listed.contains(id) && listed.contains("compliance") && listed.contains("live"),
        "{listed}"
    );
    assert!(!listed.contains(&token[31..]), "the secret is never listed");
    run_ok(agentgate(&data).args(["keys", "revoke", "--tenant", &tenant, id]));
    let listed = run_ok(agentgate(&data).args(["keys", "list", "--tenant", &tenant]));
    assert!(listed.contains("revoked or expired"), "{listed}");
    // The store holds only a keyed hash of the secret.
    let mut found = false;
    for entry in std::fs::read_dir(data.join("store")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !bytes.windows(64).any(|w| w == &token.as_bytes()[31..]),
            "the secret is on disk"
        );
        found |= bytes.windows(26).any(|w| w == id.as_bytes());
    }
    assert!(found, "the key record was scanned");

    for (args, needle) in [
        (
            vec!["keys", "create", "--tenant", &tenant, "--role", "god"],
            "unknown key role",
        ),
        (
            vec![
                "keys",
                "create",
                "--tenant",
                &tenant,
                "--role",
                "admin",
                "--expires",
                "soon",
            ],
            "--expires",
        ),
        (
            vec!["keys", "create", "--tenant", "t_nope", "--role", "admin"],
            "not a tenant id",
        ),
    ] {
        let out = agentgate(&data).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_operator_shows_and_sets_a_tenants_limits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifest = write_manifest(dir.path(), "T0LIMITS", "CLI_LIMITS_TOKEN");
    run_ok(
        agentgate(&data)
            .env("CLI_LIMITS_TOKEN", "xoxb-limits")
            .args(["installations", "import"])
            .arg(&manifest),
    );
    let tenants: serde_json::Value = serde_json::from_str(&run_ok(
        agentgate(&data).args(["tenants", "list", "--json"]),
    ))
    .unwrap();
    let id = tenants[0]["id"].as_str().unwrap().to_owned();
    let limits = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&run_ok(
            agentgate(&data)
                .args(["tenants", "limits", "--tenant", &id])
                .args(args),
        ))
        .unwrap()
    };
    let shown = limits(&[]);
    assert_eq!(shown["plan"], "free");
    let set = limits(&[
        "--plan",
        "enterprise",
        "--quota-tokens",
        "123456",
        "--run-walltime-ms",
        "9000",
    ]);
    assert_eq!(set["plan"], "enterprise");
    assert_eq!(set["quota"]["tokens"], 123_456);
    assert_eq!(set["run_ceilings"]["walltime_ms"], 9000);
    assert_eq!(set["quota"]["runs"], shown["quota"]["runs"], "kept");
    assert_eq!(limits(&[]), set, "stored");

    let out = agentgate(&data)
        .args(["tenants", "limits", "--tenant", &id, "--plan", "platinum"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected free, team or enterprise"), "{err}");
    assert_eq!(limits(&[]), set, "a refused change changes nothing");
    for (tenant, why) in [
        ("garbage", "not a tenant id"),
        ("t_01HZY3J5K6M7N8P9Q0R1S2T3V4", "does not exist"),
    ] {
        let out = agentgate(&data)
            .args(["tenants", "limits", "--tenant", tenant, "--quota-runs", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{tenant}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{tenant}: {err}");
    }
}
