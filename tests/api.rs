//! The control API: typed requests refuse unknown verbs and fields by name,
//! long work never blocks the control loop (`status`, `list` and `pause`
//! answer while a transition waits), and no guest code runs, not even a
//! single step, while a client holds the VM paused.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn error_of(g: &Guest, req: Value) -> String {
    let r = g.api(req.clone());
    assert_eq!(r["ok"], json!(false), "{req} was accepted: {r}");
    r["error"].as_str().unwrap().to_string()
}

#[test]
fn unknown_verbs_and_fields_are_refused_by_name() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("api-typed", &snap);
    g.wait_api();
    let e = error_of(&g, json!({"verb": "frobnicate"}));
    assert!(e.contains("frobnicate") && e.contains("apply"), "{e}");
    let e = error_of(&g, json!({"verb": "apply", "path": module("livepatch-sample.ko"), "replce": true}));
    assert!(e.contains("replce"), "{e}");
    let e = error_of(&g, json!({"verb": "status", "verbose": true}));
    assert!(e.contains("verbose"), "{e}");
    let e = error_of(&g, json!({"verb": "stack", "pid": 1}));
    assert!(e.contains("pid"), "{e}");
    let e = error_of(&g, json!({"verb": "disable"}));
    assert!(e.contains("name"), "{e}");
    let e = error_of(&g, json!({"verb": "apply", "path": 7}));
    assert!(e.contains("apply"), "{e}");
    // Nothing of that reached the guest or the patcher.
    let l = g.api_ok(json!({"verb": "list"}));
    assert_eq!(l["patches"], json!([]));
    assert!(l["pending"].is_null());
    assert_eq!(g.sh("echo ok-$((2*4))"), "ok-8");
}

#[test]
fn status_list_and_pause_answer_while_a_transition_waits() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("api-busy", &snap);
    g.wait_api();
    g.send("cat /proc/hp_sleep &\n");
    wait_for_frame(&g, "frames", "hp_sleep_wait+");
    // A global safe point that the sleeper holds back for up to 10 s; the
    // client asks to be answered only when it ends.
    let waiter = UnixStream::connect(&g.api_sock).unwrap();
    let mut wr = waiter.try_clone().unwrap();
    let req = json!({"verb": "apply", "path": module("hp_patch_sleep.ko"), "per_task": false, "timeout_secs": 10, "wait": true});
    wr.write_all(format!("{req}\n").as_bytes()).unwrap();
    // The operation is queued and waiting.
    let deadline = Instant::now() + CMD_TIMEOUT;
    loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"]["state"] == json!("waiting for a safe point") {
            break;
        }
        assert!(Instant::now() < deadline, "the apply never started waiting: {l}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for verb in ["status", "list"] {
        let t = Instant::now();
        g.api_ok(json!({"verb": verb}));
        assert!(t.elapsed() < Duration::from_secs(1), "{verb} took {:?} while a transition waits", t.elapsed());
    }
    let t = Instant::now();
    let p = g.api_ok(json!({"verb": "pause"}));
    assert!(t.elapsed() < Duration::from_secs(1), "pause took {:?}", t.elapsed());
    assert_eq!(p["held_by_client"], json!(true));
    // While the client holds the VM, no attempt is made: once the worker
    // has published that it sees the hold, the count stays (it would grow
    // by one every 5 ms otherwise).
    let deadline = Instant::now() + CMD_TIMEOUT;
    let held = loop {
        let l = g.api_ok(json!({"verb": "list"}));
        if l["pending"]["held_by_client"] == json!(true) {
            break l["pending"]["attempts"].clone();
        }
        assert!(Instant::now() < deadline, "the worker never saw the hold: {l}");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(g.api_ok(json!({"verb": "status"}))["state"], json!("paused"));
    assert_eq!(g.api_ok(json!({"verb": "list"}))["pending"]["attempts"], held);
    g.api_ok(json!({"verb": "resume"}));
    // The sleeper leaves: the waiting client gets its answer.
    g.sh("echo 1 > /proc/hp_wake");
    let mut line = String::new();
    BufReader::new(waiter).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], json!(true), "{v}");
    assert_eq!(v["result"]["state"], json!("done"), "{v}");
    assert_eq!(g.sh("cat /proc/hp_sleep"), "woke 7 original");
}

#[test]
fn replies_keep_the_order_of_one_clients_requests() {
    let snap = ready_snapshot(1);
    let mut g = Guest::restore("api-order", &snap);
    g.wait_api();
    let s = UnixStream::connect(&g.api_sock).unwrap();
    let mut w = s.try_clone().unwrap();
    // A slow one (worker) then quick ones (control loop), in one write.
    let reqs = [
        json!({"verb": "stack", "target": "all"}),
        json!({"verb": "status"}),
        json!({"verb": "sym", "query": "cmdline_proc_show"}),
        json!({"verb": "bogus"}),
        json!({"verb": "list"}),
    ];
    let text: String = reqs.iter().map(|r| format!("{r}\n")).collect();
    w.write_all(text.as_bytes()).unwrap();
    let mut rd = BufReader::new(s);
    let mut replies = Vec::new();
    for _ in &reqs {
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        replies.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert!(replies[0]["result"].is_array(), "{}", replies[0]);
    assert!(replies[1]["result"]["vcpus"].is_number(), "{}", replies[1]);
    assert!(replies[2]["result"].to_string().contains("cmdline_proc_show"), "{}", replies[2]);
    assert_eq!(replies[3]["ok"], json!(false));
    assert!(replies[4]["result"]["patches"].is_array(), "{}", replies[4]);
    assert_eq!(g.sh("echo ok"), "ok");
}
