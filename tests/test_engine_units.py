"""The engine as data, without subprocesses: typed facts, the planner's transactions and their
compensation, the journal's states of an interrupted transaction, locks and staging on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapterctl import endpoint_ops
from adapterctl.config import load_config
from adapterctl.facts import JournalFacts, parse
from adapterctl.journal import state_of
from adapterctl.plan import Target, plan_deploy, plan_recovery, plan_rollback
from adapterctl.steps import CompatLink, Publish, Reload, Swap, Transfer, Verify

V1, V2, V3 = "cycle1_20260101_aaaaaaaa", "cycle2_20260102_bbbbbbbb", "cycle3_20260103_cccccccc"


def _config(tmp_path: Path, reload: str = "none") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    pid = "    pidfile: ../run/serve.pid\n" if reload in ("sigusr1", "restart") else ""
    unit = "    unit: translate\n" if reload == "restart" else ""
    cfg = tmp_path / "adapterctl.yaml"
    cfg.write_text(
        f"""store: ./store
endpoints:
  e1:
    host: local
    adapter_dir: ./ep/adapters
    kind: mlx
    reload_method: {reload}
{pid}{unit}    compat_links:
      fine_tuned_m: m
models:
  m:
    source: ./src
    convert: peft
    health:
      suite: translation_en_es
      engine: command
      command: [python3, t.py, "{{release}}"]
"""
    )
    return cfg


def _facts(active=None, previous=None, releases=(), journal=None, staging=None, free=10**12, last_good=None):
    rel = [
        {"version_id": v, "complete": True, "files": {"a.bin": "0" * 64}, "mtime": float(i)}
        for i, v in enumerate(releases)
    ]
    return parse(
        "e1",
        {
            "adapter_dir_exists": True,
            "writable": True,
            "free_bytes": free,
            "platform": "linux",
            "models": {
                "m": {"active": active, "previous": previous, "releases": rel, "staging": staging or {}}
            },
            "journal": journal,
            "status": {"models": {"m": {"last_good_version": last_good}}} if last_good else None,
        },
        "/srv/adapters",
    )


def _target(tmp_path: Path, version: str = V2, size: int = 1000) -> Target:
    d = tmp_path / "store" / "m" / version
    d.mkdir(parents=True)
    (d / "a.bin").write_bytes(b"x" * size)
    return Target("m", version, {"a.bin": "1" * 64}, size, d)


def test_deploy_plan_is_a_transaction_whose_compensation_returns_to_last_good(tmp_path):
    cfg = load_config(_config(tmp_path))
    facts = _facts(active=V1, previous=None, releases=(V1, V3), last_good=V3)
    plan = plan_deploy(cfg, "d1", [_target(tmp_path)], {"e1": facts})
    [txn] = plan.transactions()
    kinds = [type(s).__name__ for s in txn.steps]
    assert (
        kinds[:2] == ["Transfer", "Publish"]
        and "Swap" in kinds
        and kinds[-3:] == ["Verify", "MarkGood", "Prune"]
    )
    swap = next(s for s in txn.steps if isinstance(s, Swap))
    assert (swap.active, swap.previous) == (V2, V1)
    back = txn.compensation[0]
    assert isinstance(back, Swap) and (back.active, back.previous) == (V3, None)  # last-good, not blindly V1
    assert isinstance(txn.compensation[-1], Reload) and txn.compensation[-1].expect == V3
    assert any(isinstance(s, CompatLink) for s in txn.compensation)
    assert "active → cycle3" in txn.compensation_text()
    transfer = next(s for s in txn.steps if isinstance(s, Transfer))
    assert transfer.bytes == 1000 and plan.bytes_to_send() == 1000
    assert transfer.link_from == V3  # the newest complete release
    assert [s.action for s in plan.steps][3:4] == ["lock"] or plan.steps[1].action == "lock"


def test_steps_are_frozen_values_with_typed_fields_and_no_dicts(tmp_path):
    cfg = load_config(_config(tmp_path))
    plan = plan_deploy(cfg, "d1", [_target(tmp_path)], {"e1": _facts(active=V1, releases=(V1,))})
    for step in plan.steps:
        with pytest.raises(AttributeError):
            step.version = "x"  # frozen
        for value in vars(step).values():
            assert not isinstance(value, dict), (step, value)
        assert step.describe() and "\n" not in step.describe()
        json.dumps(step.to_dict(), default=str)


def test_a_staged_piece_of_an_interrupted_transfer_is_not_counted_again(tmp_path):
    cfg = load_config(_config(tmp_path))
    staged = {V2: {"partial:a.bin": 400}}
    plan = plan_deploy(cfg, "d1", [_target(tmp_path)], {"e1": _facts(staging=staged)})
    transfer = next(s for s in plan.steps if isinstance(s, Transfer))
    assert transfer.bytes == 600 and "resumes" in transfer.describe()
    complete = {V2: {"a.bin": 1000}}
    plan = plan_deploy(cfg, "d1", [_target(tmp_path / "b")], {"e1": _facts(staging=complete)})
    assert next(s for s in plan.steps if isinstance(s, Transfer)).bytes == 0


def test_a_deploy_that_does_not_fit_the_endpoints_disk_is_refused_with_the_numbers(tmp_path):
    from adapterctl.errors import UsageError

    cfg = load_config(_config(tmp_path))
    with pytest.raises(UsageError) as exc:
        plan_deploy(cfg, "d1", [_target(tmp_path, size=5000)], {"e1": _facts(free=32 << 10)})
    assert "32.0 KiB free" in exc.value.message and "4.9 KiB" in exc.value.message


def _journal(*records):
    return [dict(r, txn="t1") for r in records]


BEGIN = {
    "t": "begin",
    "kind": "deploy",
    "model": "m",
    "version": V2,
    "before": {"active": V1, "previous": None},
    "target": {"active": V2, "previous": V1},
    "restore": {"active": V1, "previous": None},
}


@pytest.mark.parametrize(
    "records,active,state",
    [
        ([BEGIN, {"t": "intent", "action": "transfer"}], V1, "before-swap"),
        ([BEGIN, {"t": "intent", "action": "swap"}], V1, "half-swapped"),
        ([BEGIN, {"t": "intent", "action": "swap"}], V2, "swapped"),
        ([BEGIN, {"t": "intent", "action": "swap"}, {"t": "done", "action": "swap"}], V2, "swapped"),
        ([BEGIN, {"t": "done", "action": "swap"}, {"t": "done", "action": "verify"}], V2, "verified"),
        ([BEGIN, {"t": "done", "action": "swap"}, {"t": "compensate"}], V2, "compensating"),
        ([dict(BEGIN, kind="rollback")], V2, "rollback"),
    ],
)
def test_the_journal_names_where_an_interrupted_transaction_stopped(records, active, state):
    facts = _facts(active=active, releases=(V1, V2), journal=_journal(*records))
    assert state_of(facts.journal, facts.models["m"]).name == state


def test_recovery_after_the_swap_reloads_and_verifies_with_a_compensation(tmp_path):
    cfg = load_config(_config(tmp_path))
    records = _journal(BEGIN, {"t": "intent", "action": "swap"}, {"t": "done", "action": "swap"})
    facts = _facts(active=V2, previous=V1, releases=(V1, V2), journal=records)
    rec = plan_recovery(cfg, cfg.endpoints["e1"], facts, False)
    assert rec.txn == "t1" and rec.state.action == "roll-forward"
    assert not any(isinstance(s, Swap) for s in rec.steps)  # the swap happened: not again
    assert any(isinstance(s, Verify) for s in rec.steps) and any(isinstance(s, Reload) for s in rec.steps)
    assert isinstance(rec.compensation[0], Swap) and rec.compensation[0].active == V1
    plan = plan_deploy(cfg, "d2", [_target(tmp_path)], {"e1": facts})
    assert plan.endpoint_plans[0].recovery is not None  # the rerun's plan shows what it will finish
    assert any("interrupted" in n for n in plan.notes)


def test_an_interrupted_rollback_completes_to_its_recorded_target_not_back_again(tmp_path):
    cfg = load_config(_config(tmp_path))
    begin = dict(BEGIN, kind="rollback", version=V1, target={"active": V1, "previous": V2})
    facts = _facts(
        active=V1, previous=V2, releases=(V1, V2), journal=_journal(begin, {"t": "intent", "action": "swap"})
    )
    rec = plan_recovery(cfg, cfg.endpoints["e1"], facts, False)
    swap = next(s for s in rec.steps if isinstance(s, Swap))
    assert (swap.active, swap.previous) == (V1, V2)


def test_rollback_plan_has_no_compensation_and_verifies_report_only(tmp_path):
    cfg = load_config(_config(tmp_path))
    facts = _facts(active=V2, previous=V1, releases=(V1, V2))
    plan = plan_rollback(cfg, "r1", [("e1", "m")], {"e1": facts}, "previous")
    [txn] = plan.transactions()
    assert not txn.compensation
    verify = next(s for s in txn.steps if isinstance(s, Verify))
    assert verify.report_only


def test_restart_without_consent_is_in_the_plan_as_data(tmp_path):
    from adapterctl.plan import consent_missing

    cfg = load_config(_config(tmp_path, reload="restart"))
    plan = plan_deploy(cfg, "d1", [_target(tmp_path)], {"e1": _facts(active=V1, releases=(V1,))})
    assert consent_missing(plan) == ["e1"]
    reload = next(s for s in plan.steps if isinstance(s, Reload))
    assert "systemctl restart translate" in reload.describe() and reload.driver.method == "systemd"


# -- endpoint side, on disk ----------------------------------------------------------------------
def test_lock_is_written_whole_and_an_unreadable_one_is_named_and_breakable(tmp_path):
    adir = str(tmp_path / "a")
    got = endpoint_ops.lock_acquire(adir, {"pid": 1, "host": "h", "deployment_id": "d"})
    assert got["acquired"] and json.loads(Path(adir, ".adapterctl.lock").read_text())["deployment_id"] == "d"
    assert not [n for n in os.listdir(adir) if n.endswith(".new")]
    Path(adir, ".adapterctl.lock").write_bytes(b"\x00\x01\x02")
    found = endpoint_ops.read_lock(adir)
    assert found["state"] == "binary"
    again = endpoint_ops.lock_acquire(adir, {"pid": 2, "host": "h", "deployment_id": "e"}, break_sha="f" * 64)
    assert not again["acquired"]  # not the content the caller decided to break
    broke = endpoint_ops.lock_acquire(
        adir, {"pid": 2, "host": "h", "deployment_id": "e"}, break_sha=found["raw_sha"]
    )
    assert broke["acquired"] and broke["broken"]["state"] == "binary"


def test_journal_keeps_the_open_transaction_and_skips_a_torn_line(tmp_path):
    adir = str(tmp_path)
    endpoint_ops.journal_append(adir, [{"t": "begin", "txn": "a"}, {"t": "commit", "txn": "a"}])
    endpoint_ops.journal_append(adir, [{"t": "begin", "txn": "b", "model": "m"}, {"t": "intent", "txn": "b"}])
    with open(Path(adir, ".adapterctl", "journal.jsonl"), "ab") as f:
        f.write(b'{"t": "done", "tx')  # a kill mid-write
    open_txn = endpoint_ops.journal_open(adir)
    assert [r["t"] for r in open_txn] == ["begin", "intent"]
    assert JournalFacts(tuple(open_txn)).txn == "b"


def _release(adir: str, version: str, content: bytes) -> dict:
    stage = endpoint_ops.prepare_staging(adir, "m", version, files={"w.bin": _sha(content)})
    Path(stage["path"], "w.bin").write_bytes(content)
    endpoint_ops.finalize_release(adir, "m", version, {"w.bin": _sha(content)}, {})
    return stage


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_damaged_basis_file_is_sent_fresh_never_linked(tmp_path):
    adir = str(tmp_path)
    _release(adir, V1, b"weights")
    basis = Path(adir, "m", "releases", V1, "w.bin")
    os.chmod(basis, 0o644)
    basis.write_bytes(b"weightz")  # a flipped byte (stamp changes: mtime)
    prep = endpoint_ops.prepare_staging(adir, "m", V2, files={"w.bin": _sha(b"weights")}, link_from=V1)
    assert prep["send"] == ["w.bin"] and prep["damaged"] == ["w.bin"] and prep["linked"] == []
    st = basis.stat()
    basis.write_bytes(b"weights")
    os.utime(basis, ns=(st.st_atime_ns, st.st_mtime_ns))  # repaired, stamp as recorded
    prep = endpoint_ops.prepare_staging(adir, "m", V3, files={"w.bin": _sha(b"weights")}, link_from=V1)
    assert prep["linked"] == ["w.bin"]


def test_pieces_of_a_killed_rsync_are_kept_for_resuming_and_strays_removed(tmp_path):
    adir = str(tmp_path)
    files = {"w.bin": "0" * 64}
    stage = Path(endpoint_ops.prepare_staging(adir, "m", V1, files=files)["path"])
    (stage / ".w.bin.AbC123").write_bytes(b"half")  # rsync's temp name, receiver killed
    (stage / "stray.txt").write_text("x")
    prep = endpoint_ops.prepare_staging(adir, "m", V1, files=files)
    assert prep["pieces"] == 1 and prep["send"] == ["w.bin"]
    assert (stage / endpoint_ops.PARTIAL_DIR / "w.bin").read_bytes() == b"half"
    assert sorted(os.listdir(stage)) == [endpoint_ops.PARTIAL_DIR]
    facts = endpoint_ops.facts(adir, ["m"])
    assert facts["models"]["m"]["staging"] == {V1: {"partial:w.bin": 4}}


def test_a_local_copy_resumes_from_its_partial_file(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "w.bin").write_bytes(b"a" * 1000 + b"b" * 1000)
    (dest / ".w.bin.partial").write_bytes(b"a" * 1000)
    sent = endpoint_ops.copy_tree(str(src), str(dest), ["w.bin"])
    assert sent == (1, 1000) and (dest / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


def test_publish_records_stamps_and_makes_files_read_only(tmp_path):
    adir = str(tmp_path)
    _release(adir, V1, b"weights")
    meta = json.loads(Path(adir, "m", "releases", V1, "RELEASE.json").read_text())
    path = Path(adir, "m", "releases", V1, "w.bin")
    assert meta["stamps"]["w.bin"] == endpoint_ops.file_stamp(str(path))
    assert not os.access(path, os.W_OK) or os.geteuid() == 0


def test_leftovers_lists_staging_and_temp_files_and_gc_removes_them(tmp_path):
    adir = str(tmp_path)
    endpoint_ops.prepare_staging(adir, "m", V1, files={"w.bin": "0" * 64})
    Path(adir, ".status.json.123.tmp").write_text("{}")
    left = endpoint_ops.leftovers(adir, ["m"])
    assert {Path(x["path"]).name for x in left} == {f"{V1}.tmp", ".status.json.123.tmp"}
    assert endpoint_ops.leftovers(adir, ["m"], keep=[V1]) == [x for x in left if "status" in x["path"]]
    endpoint_ops.remove_leftovers(adir, ["m"])
    assert endpoint_ops.leftovers(adir, ["m"]) == []


def test_plan_steps_reference_publish_after_transfer(tmp_path):
    cfg = load_config(_config(tmp_path))
    plan = plan_deploy(cfg, "d1", [_target(tmp_path)], {"e1": _facts()})
    actions = [s.action for s in plan.steps]
    assert actions.index("transfer") < actions.index("publish") < actions.index("swap")
    assert isinstance(plan.steps[actions.index("publish")], Publish)


@pytest.mark.parametrize(
    "fmt,extra,refused",
    [
        ("adapter", {"use_dora": True}, "DoRA"),
        ("adapter", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("adapter", {"rank_pattern": {"v_proj": 4}}, "per-module ranks"),
        ("fused", {"use_dora": True}, "DoRA"),
        ("lora", {"alpha_pattern": {"v_proj": 4}}, "per-module alphas"),
        ("lora", {"use_rslora": True}, "rsLoRA"),
        ("merged", {"use_dora": True}, None),
        ("merged", {"alpha_pattern": {"v_proj": 4}}, None),
    ],
)
def test_what_an_endpoints_format_cannot_express_is_refused_at_plan_time(tmp_path, fmt, extra, refused):
    from adapterctl.demo import make_adapter
    from adapterctl.errors import UsageError

    kind = "mlx" if fmt in ("adapter", "fused") else "gguf"
    cfg_path = _config(tmp_path)
    text = cfg_path.read_text().replace("kind: mlx", f"kind: {kind}")
    text = text.replace(
        "    convert: peft\n", f"    convert:\n      {kind}: {{format: {fmt}, fidelity: false}}\n"
    )
    cfg_path.write_text(text)
    src = make_adapter(tmp_path / "src" / "run1", seed=1)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(config | extra))
    cfg = load_config(cfg_path)
    target = Target(
        "m", V2, {"adapter_model.safetensors": "0" * 64}, 100, tmp_path / "store" / "m" / V2, source=src
    )
    if refused is None:
        with pytest.raises(Exception) as exc:  # past the feature check: merged needs the base model
            plan_deploy(cfg, "d1", [target], {"e1": _facts()})
        assert "base_dir" in str(exc.value)
        return
    with pytest.raises(UsageError) as exc:
        plan_deploy(cfg, "d1", [target], {"e1": _facts()})
    assert refused in exc.value.message and "endpoint e1" in exc.value.message
