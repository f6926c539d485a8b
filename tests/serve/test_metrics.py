"""Prometheus text exposition of the serving metrics."""

from __future__ import annotations

from abkd_deploy.serve.metrics import ServeMetrics


def test_histogram_is_cumulative_with_le_semantics() -> None:
    m = ServeMetrics()
    for v in (0.5, 1, 3, 100):
        m.observe_batch(v, 0.001)
    lines = [ln for ln in m.render().splitlines() if ln.startswith("abkd_serve_batch_size")]
    assert lines[:4] == [
        'abkd_serve_batch_size_bucket{le="1.0"} 2.0',
        'abkd_serve_batch_size_bucket{le="2.0"} 2.0',
        'abkd_serve_batch_size_bucket{le="4.0"} 3.0',
        'abkd_serve_batch_size_bucket{le="8.0"} 3.0',
    ]
    assert 'abkd_serve_batch_size_bucket{le="+Inf"} 4.0' in lines
    assert "abkd_serve_batch_size_sum 104.5" in lines and "abkd_serve_batch_size_count 4.0" in lines


def test_render() -> None:
    m = ServeMetrics(info={"provider": 'CPU"x', "format": "embedded"})
    m.observe_request(200, 0.003)
    m.observe_request(422, 0.0001, "invalid_node_ids")
    m.observe_request(400, 0.0001, "malformed_json")
    m.observe_batch(64, 0.0012)
    text = m.render()
    assert text.endswith("\n")
    assert 'abkd_serve_info{format="embedded",provider="CPU\\"x"} 1.0' in text  # labels sorted
    assert 'abkd_serve_requests_total{code="200"} 1' in text
    assert 'abkd_serve_errors_total{code="422",reason="invalid_node_ids"} 1' in text
    assert 'abkd_serve_errors_total{code="400",reason="malformed_json"} 1' in text
    assert "abkd_serve_node_ids_total 64" in text
    assert 'abkd_serve_batch_size_bucket{le="64.0"} 1.0' in text
    assert 'abkd_serve_batch_size_bucket{le="32.0"} 0.0' in text
    assert "abkd_serve_request_latency_seconds_count 3" in text
    assert "abkd_serve_inference_latency_seconds_sum 0.0012" in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)) == 7
