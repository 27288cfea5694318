//! A store that cannot be written: a full disk, a file-size limit, a read-only store or
//! `entries/` folder. Each time the failing run says which path could not be written, nothing
//! is half-committed (no new entry, no staging folder left, `pipe verify` clean), and the next
//! run without the limit works.
//!
//! A real full disk needs a small filesystem: the tests mount a tmpfs inside a private user and
//! mount namespace (`unshare -rm`), which needs no privileges where unprivileged user namespaces
//! are enabled, and skip with a message where they are not. The same error paths (a `write`
//! failing halfway through a stage's output or pipe's `manifest.json`) are also exercised
//! everywhere through `RLIMIT_FSIZE`. A read-only store uses a read-only bind mount in such a
//! namespace; without one, `chmod` (which does not stop root, so that variant is skipped for
//! root).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::util::{Dir, Output, PIPE, assert_store_sound, node, snapshot, staging_dirs, statuses};

/// seed: a small first node. big: needs its seed, then writes 512 kB with `dd` (whose error
/// names the file). many: needs its seed, then writes `count` empty files with long names (they
/// take no space) so that the manifest pipe writes for them is large.
const PIPELINE: &str = r#"
name: storage
stages:
  seed:
    kind: shell
    params:
      cmd: echo seed >> runs.log; echo 7 > "$PIPE_OUT/v"
  big:
    kind: shell
    inputs: {s: seed}
    params:
      cmd: |
        set -e
        echo big >> runs.log
        dd if=/dev/zero of="$PIPE_OUT/big.bin" bs=64k count=8
        cat "$PIPE_IN_s/v" > "$PIPE_OUT/v"
  many:
    kind: shell
    inputs: {s: seed}
    params:
      count: 200
      cmd: |
        set -e
        echo many >> runs.log
        i=0
        while [ $i -lt $PIPE_PARAM_count ]; do
          : > "$PIPE_OUT/file-$i-with-a-rather-long-name-so-that-the-manifest-grows-quickly.txt"
          i=$((i + 1))
        done
        cat "$PIPE_IN_s/v" > "$PIPE_OUT/v"
"#;

/// Whether `unshare -rm` (a private user + mount namespace) works here.
fn private_mounts_available() -> bool {
    Command::new("unshare")
        .args(["-rm", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `script` with `sh` inside `unshare -rm`, in the work dir, with `PIPE` and `STORE` set.
fn in_private_mounts(dir: &Dir, script: &str) -> Output {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .current_dir(&dir.root)
        .env("PIPE", PIPE)
        .env("STORE", &dir.store)
        .env_remove("PIPE_STORE")
        .env_remove("PIPE_LOG")
        .output()
        .expect("start unshare");
    Output::from_process(&["unshare -rm sh -c ..."], out)
}

/// The error line pipe printed for node `id` (`failed: <id>: ...`).
#[track_caller]
fn failure_of(out: &Output, id: &str) -> String {
    let doc = out.json();
    assert_eq!(node(&doc, id)["status"], "failed", "{}", out.stderr);
    node(&doc, id)["error"]
        .as_str()
        .expect("error message")
        .to_string()
}

#[test]
fn a_file_size_limit_fails_the_node_naming_the_file_and_commits_nothing() {
    let dir = Dir::new("fsize");
    let p = dir.pipeline("storage.yaml", PIPELINE);
    dir.pipe(&["run", &p, "seed"]).code(0);
    let before = snapshot(&dir.store.join("entries"));

    // every file pipe and its stages write is limited to 16 kB; SIGXFSZ is ignored, so the
    // write fails with EFBIG instead of killing the writer
    let limited = |args: &[&str]| -> Output {
        let mut cmd = dir.command(args);
        // SAFETY: setrlimit and signal are async-signal-safe and touch no memory of the parent.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 16 * 1024,
                    rlim_max: 16 * 1024,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        Output::from_process(args, cmd.output().expect("start pipe"))
    };

    // the stage's own write fails: the node fails with its error, which names the file
    let out = limited(&["run", &p, "big", "--json"]).code(1);
    let err = failure_of(&out, "big");
    assert!(
        err.contains("big.bin") && err.contains("File too large"),
        "{err}"
    );

    // the stage's files fit, the manifest pipe writes does not: the error names it
    let out = limited(&["run", &p, "many", "--json"]).code(1);
    let err = failure_of(&out, "many");
    assert!(err.contains("commit failed"), "{err}");
    assert!(
        err.contains("manifest.json") && err.contains("File too large"),
        "{err}"
    );
    assert!(
        err.contains(&*dir.store.to_string_lossy()),
        "names the path: {err}"
    );

    // nothing half-committed
    assert_eq!(
        snapshot(&dir.store.join("entries")),
        before,
        "entries changed"
    );
    assert_eq!(staging_dirs(&dir.store), Vec::<String>::new());
    assert_eq!(assert_store_sound(&dir, "after the failures"), 1);

    // without the limit the same nodes complete
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        crate::util::expect(&[("seed", "cached"), ("big", "ran"), ("many", "ran")])
    );
    assert_eq!(assert_store_sound(&dir, "after the rerun"), 3);
    let show = dir.json(&["show", &p, "many"], 0);
    let path = node(&show, "many")["path"]
        .as_str()
        .expect("committed")
        .to_string();
    let files = std::fs::read_dir(path).expect("entry").count();
    assert_eq!(files, 200 + 3, "200 files, v, log.txt, manifest.json");
}

#[test]
fn a_full_disk_fails_the_node_naming_the_file_and_commits_nothing() {
    if !private_mounts_available() {
        eprintln!("skipped: `unshare -rm` is not available here (no user namespaces), so no tmpfs");
        return;
    }
    let dir = Dir::new("diskfull");
    let p = dir.pipeline("storage.yaml", PIPELINE);
    std::fs::create_dir_all(&dir.store).expect("mount point");
    // a 128 kB tmpfs as the store; 1,500 files make a ~300 kB manifest
    let script = format!(
        r#"
set -u
mount -t tmpfs -o size=128k tmpfs "$STORE" || exit 99
run() {{ "$PIPE" --store "$STORE" "$@"; }}
snap() {{ (cd "$STORE" && find entries -type f -exec cksum {{}} + | sort); }}
run run {p} seed > /dev/null 2>&1 || exit 98
snap > before.txt
run run {p} big --json > big.json 2> big.err; echo $? > big.code
run run {p} many --set many.count=1500 --json > many.json 2> many.err; echo $? > many.code
snap > after.txt
ls -A "$STORE/tmp" > tmp.txt
run verify > verify.txt 2>&1; echo $? > verify.code
mount -o remount,size=64m "$STORE"
run run {p} --set many.count=1500 --json > again.json 2> again.err; echo $? > again.code
run verify > verify2.txt 2>&1; echo $? > verify2.code
"#
    );
    let out = in_private_mounts(&dir, &script);
    if out.code == 99 {
        eprintln!("skipped: cannot mount a tmpfs here: {}", out.stderr);
        return;
    }
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let code = |name: &str| dir.read(&format!("{name}.code")).trim().to_string();
    let result = |name: &str| Output {
        args: name.to_string(),
        code: code(name).parse().expect("exit code"),
        stdout: dir.read(&format!("{name}.json")),
        stderr: dir.read(&format!("{name}.err")),
    };

    let big = result("big").code(1);
    let err = failure_of(&big, "big");
    assert!(
        err.contains("big.bin") && err.contains("No space left on device"),
        "{err}"
    );
    let many = result("many").code(1);
    let err = failure_of(&many, "many");
    assert!(err.contains("commit failed"), "{err}");
    assert!(
        err.contains("manifest.json") && err.contains("No space left on device"),
        "{err}"
    );
    assert!(
        err.contains(&*dir.store.to_string_lossy()),
        "names the path: {err}"
    );

    assert_eq!(
        dir.read("before.txt"),
        dir.read("after.txt"),
        "entries changed"
    );
    assert!(!dir.read("before.txt").is_empty(), "seed is committed");
    assert_eq!(
        dir.read("tmp.txt").trim(),
        "",
        "left in tmp/: {}",
        dir.read("tmp.txt")
    );
    assert_eq!(code("verify"), "0", "{}", dir.read("verify.txt"));
    assert!(
        dir.read("verify.txt")
            .contains("1 entries checked, 0 problem"),
        "{}",
        dir.read("verify.txt")
    );

    // with room again, the same run completes
    let again = result("again").code(0);
    assert_eq!(
        statuses(&again.json()),
        crate::util::expect(&[("seed", "cached"), ("big", "ran"), ("many", "ran")])
    );
    assert_eq!(code("verify2"), "0", "{}", dir.read("verify2.txt"));
    assert!(
        dir.read("verify2.txt")
            .contains("3 entries checked, 0 problem"),
        "{}",
        dir.read("verify2.txt")
    );
}

/// Makes `path` (recursively) unwritable with chmod, for a non-root user.
fn chmod_read_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).expect("stat");
        if meta.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .expect("list")
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        let mode = meta.permissions().mode() & !0o222;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

/// How to make part of the store read-only here, if there is a way.
enum ReadOnly {
    /// A read-only bind mount in `unshare -rm`.
    BindMount,
    /// `chmod a-w` (not root).
    Chmod,
}

/// The way to make the store read-only here; `None` (saying on stderr that the test is
/// skipped) for root without user namespaces.
fn read_only_method() -> Option<ReadOnly> {
    if private_mounts_available() {
        return Some(ReadOnly::BindMount);
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        eprintln!(
            "skipped: running as root without user namespaces: chmod does not stop root and a \
             read-only bind mount is not possible"
        );
    }
    (!root).then_some(ReadOnly::Chmod)
}

/// Runs `pipe ARGS` with `sub` (a folder of the store, "" for all of it) read-only.
fn run_read_only(dir: &Dir, method: &ReadOnly, sub: &str, args: &[&str]) -> Output {
    let target = dir.store.join(sub);
    match method {
        ReadOnly::Chmod => {
            chmod_read_only(&target);
            let out = dir.pipe(args);
            // Dir's drop restores permissions too, but the checks below read and write the store
            crate::util::make_writable(&target);
            out
        }
        ReadOnly::BindMount => {
            let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
            let script = format!(
                r#"
mount --bind "{t}" "{t}" && mount -o remount,bind,ro "{t}" || exit 99
exec "$PIPE" --store "$STORE" {args}
"#,
                t = target.display(),
                args = quoted.join(" ")
            );
            let out = in_private_mounts(dir, &script);
            assert_ne!(out.code, 99, "cannot bind-mount read-only: {}", out.stderr);
            Output {
                args: args.join(" "),
                ..out
            }
        }
    }
}

#[test]
fn a_read_only_store_is_refused_naming_the_path_and_left_unchanged() {
    let Some(method) = read_only_method() else {
        return;
    };
    let dir = Dir::new("readonly");
    let p = dir.pipeline("storage.yaml", PIPELINE);
    dir.pipe(&["run", &p, "seed"]).code(0);
    let before = snapshot(&dir.store);

    let out = run_read_only(&dir, &method, "", &["run", &p, "--json"]).code(2);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let msg = out.stderr.trim().to_string();
    assert!(msg.contains("cannot open the store"), "{msg}");
    assert!(
        msg.contains(&*dir.store.to_string_lossy()),
        "names the path: {msg}"
    );
    assert!(
        msg.contains("Read-only file system") || msg.contains("Permission denied"),
        "{msg}"
    );
    assert_eq!(snapshot(&dir.store), before, "the store changed");
    assert_eq!(dir.count("runs.log", "big"), 0, "nothing ran");

    dir.json(&["run", &p], 0);
    assert_eq!(assert_store_sound(&dir, "after the rerun"), 3);
}

#[test]
fn a_read_only_store_can_still_be_planned_shown_logged_and_verified() {
    let Some(method) = read_only_method() else {
        return;
    };
    let dir = Dir::new("readonly-read");
    let p = dir.pipeline("storage.yaml", PIPELINE);
    let first = dir.json(&["run", &p, "big"], 0);
    let big_key = crate::util::key_of(&first, "big");
    let before = snapshot(&dir.store);

    let plan = run_read_only(&dir, &method, "", &["plan", &p, "--json"]).code(0);
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan JSON");
    let st = statuses(&plan);
    assert_eq!(st["seed"], "cached", "{plan:#}");
    assert_eq!(st["big"], "cached", "{plan:#}");
    assert_eq!(st["many"], "to-run", "{plan:#}");

    let show = run_read_only(&dir, &method, "", &["show", &p, "big"]).code(0);
    assert!(show.stdout.contains(&big_key[..12]), "{}", show.stdout);
    let log = run_read_only(&dir, &method, "", &["log", &p, "big"]).code(0);
    assert!(
        log.stdout.contains("records in"),
        "dd's lines in the log: {}",
        log.stdout
    );
    let verify = run_read_only(&dir, &method, "", &["verify"]).code(0);
    assert!(
        verify.stdout.contains("2 entries checked, 0 problem"),
        "{}",
        verify.stdout
    );
    // damage under the read-only mount is still found (the store is read, not trusted)
    let v = dir
        .store
        .join("entries")
        .join(&big_key[..2])
        .join(&big_key)
        .join("v");
    let good = std::fs::read(&v).expect("v");
    std::fs::write(&v, "8\n").expect("damage");
    let verify = run_read_only(&dir, &method, "", &["verify"]).code(1);
    assert!(verify.stdout.contains("1 problem"), "{}", verify.stdout);
    std::fs::write(&v, good).expect("repair");

    // writing is still refused, and nothing above changed the store
    run_read_only(&dir, &method, "", &["run", &p]).code(2);
    assert_eq!(snapshot(&dir.store), before, "the store changed");
    assert_eq!(dir.count("runs.log", "many"), 0, "nothing ran");
}

#[test]
fn read_only_entries_fail_the_commit_naming_the_path_and_leave_no_staging() {
    let Some(method) = read_only_method() else {
        return;
    };
    let dir = Dir::new("readonly-entries");
    let p = dir.pipeline("storage.yaml", PIPELINE);
    dir.pipe(&["run", &p, "seed"]).code(0);
    let before = snapshot(&dir.store.join("entries"));

    let out = run_read_only(&dir, &method, "entries", &["run", &p, "big", "--json"]).code(1);
    let err = failure_of(&out, "big");
    assert!(err.contains("commit failed"), "{err}");
    assert!(
        err.contains(&*dir.store.join("entries").to_string_lossy()),
        "names the path: {err}"
    );
    assert!(
        err.contains("Read-only file system") || err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(
        snapshot(&dir.store.join("entries")),
        before,
        "entries changed"
    );
    assert_eq!(staging_dirs(&dir.store), Vec::<String>::new());
    assert_eq!(assert_store_sound(&dir, "after the failure"), 1);

    let doc = dir.json(&["run", &p, "big"], 0);
    assert_eq!(node(&doc, "big")["status"], "ran");
    assert_eq!(assert_store_sound(&dir, "after the rerun"), 2);
}
