//! Introspection verbs (`ps`, `stack`, `sym`, `types`, `ftrace`, `mods`,
//! `klp`): one implementation over an opened [`Kernel`], served by the live
//! API and by `--image` alike, with a JSON result and a text view.

use anyhow::{bail, Context, Result};
use introspect::kernel::Kernel;
use serde_json::{json, Value};

/// Verbs this module answers.
pub const VERBS: &[&str] = &["ps", "stack", "sym", "types", "ftrace", "mods", "klp", "layout"];

fn all() -> String {
    "all".into()
}

/// The introspection verbs, typed: unknown fields are refused by name.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum InspectRequest {
    /// Every guest thread.
    Ps {},
    /// Where the kernel lives (KASLR, page tables, regions).
    Layout {},
    /// Kernel stacks of one pid or of `all`.
    Stack {
        #[serde(default = "all")]
        target: String,
    },
    /// A symbol's addresses, or the symbol at `0x...`.
    Sym { query: String },
    /// A struct's layout from BTF.
    Types {
        #[serde(rename = "struct")]
        name: String,
    },
    /// A function's ftrace call site and record.
    Ftrace {
        function: String,
        #[serde(default)]
        sympos: u32,
    },
    /// Loaded modules.
    Mods {},
    /// The guest's own livepatches.
    Klp {},
}

/// Runs `verb` with the request's other fields against `k` (the CLI's
/// `--image` path): decoded into [`InspectRequest`] first.
pub fn run_verb(k: &Kernel<'_>, verb: &str, req: &Value) -> Result<Value> {
    let mut req = req.clone();
    if let Value::Object(o) = &mut req {
        o.insert("verb".into(), Value::String(verb.into()));
    }
    let typed: InspectRequest = serde_json::from_value(req).with_context(|| verb.to_string())?;
    run(k, &typed)
}

/// Runs one introspection request against `k`.
pub fn run(k: &Kernel<'_>, req: &InspectRequest) -> Result<Value> {
    match req {
        InspectRequest::Ps {} => Ok(serde_json::to_value(k.tasks()?)?),
        InspectRequest::Layout {} => Ok(serde_json::to_value(k.layout()?)?),
        InspectRequest::Stack { target } => Ok(serde_json::to_value(k.task_stacks(target)?)?),
        InspectRequest::Sym { query } => sym(k, query),
        InspectRequest::Types { name } => {
            let members = k.btf.describe_struct(name)?;
            Ok(json!({"struct": name, "size": k.btf.struct_size(name)?, "members": serde_json::to_value(members)?}))
        }
        InspectRequest::Ftrace { function, sympos } => {
            let records = k.ftrace_records()?;
            Ok(serde_json::to_value(k.call_site(function, *sympos, &records)?)?)
        }
        InspectRequest::Mods {} => {
            let mods = k.modules()?;
            Ok(Value::Array(
                mods.iter()
                    .map(|m| {
                        let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
                        if let Value::Object(o) = &mut v {
                            o.insert("proc_line".into(), Value::String(m.proc_line()));
                        }
                        v
                    })
                    .collect(),
            ))
        }
        InspectRequest::Klp {} => Ok(serde_json::to_value(k.klp_patches()?)?),
    }
}

fn parse_addr(q: &str) -> Option<u64> {
    let h = q.strip_prefix("0x").or_else(|| q.strip_prefix("0X"))?;
    u64::from_str_radix(h, 16).ok()
}

/// `sym <addr>` answers like the kernel's `%pS`; `sym <name>` lists every
/// /proc/kallsyms line with that name (vmlinux, modules, ftrace), typed as
/// /proc/kallsyms types them.
fn sym(k: &Kernel<'_>, q: &str) -> Result<Value> {
    if let Some(addr) = parse_addr(q) {
        if let Some(s) = k.syms.resolve(addr) {
            return Ok(json!({"addr": addr, "symbol": s.format(), "name": s.name, "offset": s.offset, "size": s.size}));
        }
        if let Some(m) = k.module_address_lookup(addr)? {
            return Ok(json!({"addr": addr, "symbol": format!("{}+{:#x}/{:#x} [{}]", m.name, m.offset, m.size, m.module), "name": m.name, "offset": m.offset, "size": m.size, "module": m.module}));
        }
        // Not something %pS names, but /proc/kallsyms lists it.
        if let Some(t) = k.ftrace_kallsyms()?.into_iter().find(|t| addr >= t.addr && addr - t.addr < t.size.max(1)) {
            let off = addr - t.addr;
            return Ok(json!({"addr": addr, "symbol": format!("{}+{:#x}/{:#x} [{}]", t.name, off, t.size, t.module), "name": t.name, "offset": off, "size": t.size, "module": t.module}));
        }
        bail!("no symbol covers {addr:#x}");
    }
    let mut hits: Vec<Value> = k
        .syms
        .lookup_symbols(q)
        .into_iter()
        .map(|s| json!({"name": q, "addr": s.addr, "type": s.kind.to_string(), "module": Value::Null}))
        .collect();
    for s in k.extra_kallsyms().context("reading module and ftrace symbols")? {
        if s.name == q {
            hits.push(json!({"name": q, "addr": s.addr, "type": s.kind.to_string(), "module": s.module}));
        }
    }
    if hits.is_empty() {
        bail!("symbol {q:?} not found in guest kallsyms or module symbols");
    }
    Ok(Value::Array(hits))
}

/// The text view of a verb's JSON result.
pub fn render(verb: &str, v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let hex = |v: &Value| v.as_u64().map(|n| format!("{n:#x}")).unwrap_or_else(|| s(v));
    match verb {
        "ps" => {
            out.push_str(&format!("{:>6} {:>6} {:<16} {:>2} {:>3} {:>4}\n", "PID", "TGID", "COMM", "S", "CPU", "vCPU"));
            for t in v.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:>6} {:>6} {:<16} {:>2} {:>3} {:>4}\n",
                    s(&t["pid"]),
                    s(&t["tgid"]),
                    s(&t["proc_comm"]),
                    s(&t["state"]),
                    s(&t["cpu"]),
                    s(&t["running_on"])
                ));
            }
        }
        "stack" => {
            for t in v.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "pid {} ({}) {}{}\n",
                    s(&t["pid"]),
                    s(&t["comm"]),
                    if t["reliable"].as_bool() == Some(true) { "reliable" } else { "UNRELIABLE" },
                    t["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default()
                ));
                for f in t["frames"].as_array().into_iter().flatten() {
                    out.push_str(&format!("  [<{}>] {}\n", hex(&f["ip"]), s(&f["symbol"])));
                }
            }
        }
        "sym" => match v {
            Value::Array(a) => {
                for h in a {
                    let m = h["module"].as_str().map(|m| format!(" [{m}]")).unwrap_or_default();
                    out.push_str(&format!("{:016x} {} {}{}\n", h["addr"].as_u64().unwrap_or(0), s(&h["type"]), s(&h["name"]), m));
                }
            }
            other => out.push_str(&format!("{} {}\n", hex(&other["addr"]), s(&other["symbol"]))),
        },
        "types" => {
            out.push_str(&format!("struct {} {{ /* size {} */\n", s(&v["struct"]), s(&v["size"])));
            for m in v["members"].as_array().into_iter().flatten() {
                let indent = "    ".repeat(1 + m["depth"].as_u64().unwrap_or(0) as usize);
                let bits = match m["bitfield_size"].as_u64() {
                    Some(b) if b > 0 => format!(":{b}"),
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "{indent}{}{bits}; /* {} {} */\n",
                    s(&m["decl"]),
                    s(&m["offset"]),
                    s(&m["size"])
                ));
            }
            out.push_str("};\n");
        }
        "ftrace" => {
            out.push_str(&format!(
                "{} at {} site {}: {} ({})\n",
                s(&v["function"]),
                hex(&v["func_addr"]),
                hex(&v["site"]),
                s(&v["text"]),
                s(&v["target_symbol"])
            ));
            match v.get("record") {
                Some(Value::Object(r)) => out.push_str(&format!(
                    "ftrace record: flags {} ({})\n",
                    hex(&r["flags"]),
                    if r["flags"].as_u64().unwrap_or(0) & r["bits"]["enabled"].as_u64().unwrap_or(0) != 0 { "enabled" } else { "not enabled" }
                )),
                _ => out.push_str("no ftrace record (notrace function)\n"),
            }
        }
        "mods" => {
            for m in v.as_array().into_iter().flatten() {
                out.push_str(&format!("{}\n", s(&m["proc_line"])));
            }
        }
        "klp" => {
            for p in v.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{} enabled={} transition={} replace={}\n",
                    s(&p["name"]),
                    s(&p["enabled"]),
                    s(&p["transition"]),
                    s(&p["replace"])
                ));
                for st in p["states"].as_array().into_iter().flatten() {
                    out.push_str(&format!("  state id={} version={}\n", s(&st["id"]), s(&st["version"])));
                }
                for o in p["objects"].as_array().into_iter().flatten() {
                    out.push_str(&format!("  object {} patched={}\n", o["name"].as_str().unwrap_or("vmlinux"), s(&o["patched"])));
                    for f in o["funcs"].as_array().into_iter().flatten() {
                        out.push_str(&format!(
                            "    {},{} old={} new={} patched={} transition={}\n",
                            s(&f["old_name"]),
                            s(&f["old_sympos"]),
                            hex(&f["old_func"]),
                            s(&f["new_func_symbol"]),
                            s(&f["patched"]),
                            s(&f["transition"])
                        ));
                    }
                }
            }
        }
        _ => out.push_str(&format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())),
    }
    out
}
