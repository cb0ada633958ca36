"""The throughput benchmark in its CI size, on real browsers, so it cannot rot: every cell and the kill
run answered correctly and lost nothing, and the JSON holds what the README's table is made of. No
speed is asserted: the machine is shared."""

from __future__ import annotations

import orjson

from benchmarks import throughput


def test_quick_throughput_run_answers_everything_correctly(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("WEBPOOL_RESULTS", str(tmp_path))
    r = throughput.main(["--quick"])          # on the session's Ray
    written = orjson.loads((tmp_path / "throughput-quick.json").read_bytes())
    assert written["cells"] == orjson.loads(orjson.dumps(r["cells"]))
    assert (tmp_path / "throughput_kill-quick.png").stat().st_size > 1000
    assert {(c["batching"], c["clients"]) for c in r["cells"]} == {(b, n) for b in (False, True) for n in (1, 4)}
    for cell in r["cells"]:
        assert cell["answered"] > 0 and cell["wrong"] == 0 and cell["errors"] == 0, cell
        assert cell["requests_per_s"]["n"] == cell["trials"] == 2
        assert cell["latency"]["p99_ms"] >= cell["latency"]["median_ms"] > 0
    kills = r["kill"]
    assert kills["answered"] > 0 and kills["wrong"] == 0 and kills["errors"] == 0, kills
    assert len(kills["runs"]) == kills["dip_s"]["n"] == 1 and kills["shown"] == 0
    for kill in kills["runs"]:
        assert kill["recovery_statistics"]["recovery_attempts"] >= 1
        assert sum(kill["answers_per_s"]) * kill["bin_s"] <= kill["answered"]
    assert kills["answered"] == sum(k["answered"] for k in kills["runs"])
    assert r["targets"]["kill"]["runs"] == 1
    native = r["native_onnxruntime"]["1_threads"]
    assert native["best_rows_per_s_median"] > 0 and set(native["by_batch"]) == {"1", "8"}
    assert set(r["targets"]) >= {"vs_one_sequential_client", "vs_batching_off", "vs_native_onnxruntime_best", "kill"}
