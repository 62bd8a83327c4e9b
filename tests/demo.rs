//! `segstream demo --duration 20s` — what README's first command runs, at its default rate —
//! exits 0 having formed segments from the synthetic personas, with the malformed share
//! dead-lettered.

use std::process::Command;

#[test]
fn demo_runs_for_its_duration_and_forms_segments() {
    let out = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["demo", "--duration", "20s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("metrics: http://127.0.0.1:"), "{stdout}");
    let last = stdout.lines().last().unwrap();
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("generated "))
        .unwrap();
    // "N users assigned to K segments; agreement with the generator's 6 personas: ARI = x"
    let words: Vec<&str> = last.split_whitespace().collect();
    let users: usize = words[0].parse().unwrap();
    let segments: usize = words[4].parse().unwrap();
    let ari: f64 = words.last().unwrap().parse().unwrap();
    // The figures depend on how many events each user had: the summary says.
    assert!(users > 1_500, "{last}\n{summary}");
    assert!(segments >= 5, "{last}\n{summary}");
    assert!(ari >= 0.85, "{last}\n{summary}");
    let dead: u64 = summary
        .split("dead-lettered ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    let malformed: u64 = summary
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(dead, malformed, "{summary}");
}
