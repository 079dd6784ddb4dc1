import logging

from thinkforge.progress import GenerationProgress


def test_in_a_log_every_phase_reports_its_progress_and_its_end(caplog, monkeypatch):
    monkeypatch.setattr("thinkforge.progress.on_terminal", lambda: False)
    clock = iter([0.0, 0.0, 40.0, 50.0, 80.0])
    monkeypatch.setattr("thinkforge.progress.time.perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="thinkforge.progress"):
        progress = GenerationProgress(8, "gsm8k: samples", every_s=30.0)
        progress.step(new_tokens=400, finished=2)
        progress.end_batch(rows=4, new_tokens=800)
        progress.end_batch(rows=4, new_tokens=800)
        progress.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0] == "gsm8k: samples: 4/8 samples, 20 new tokens/s, 40 s elapsed, about 40 s left"
    assert lines[-1] == "gsm8k: samples: 8/8 samples, 20 new tokens/s, done in 80 s"


def test_in_a_log_a_short_phase_stays_silent(caplog, monkeypatch):
    monkeypatch.setattr("thinkforge.progress.on_terminal", lambda: False)
    clock = iter([0.0, 2.0, 3.0])
    monkeypatch.setattr("thinkforge.progress.time.perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="thinkforge.progress"):
        progress = GenerationProgress(8, "held-out", every_s=30.0)
        progress.end_batch(rows=8, new_tokens=100)
        progress.close()
    assert caplog.records == []
