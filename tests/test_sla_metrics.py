"""The SLA metrics: preemptions by cause and queue time per priority and tenant, read back from
the registry (prometheus_client's own accounting is the reference)."""

from __future__ import annotations

from scheduler_svc.metrics import ServingMetrics


def value(metrics: ServingMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_preemptions_by_cause_advance_by_the_new_counts():
    metrics = ServingMetrics()
    metrics.observe_preemption_causes({"memory": 2, "priority": 0})
    metrics.observe_preemption_causes({"memory": 3, "priority": 4})
    assert value(metrics, "omnibus_preemptions_by_cause_total", cause="memory") == 3
    assert value(metrics, "omnibus_preemptions_by_cause_total", cause="priority") == 4


def test_queue_time_per_priority_and_bounded_tenant_labels():
    metrics = ServingMetrics()
    metrics.known_tenants = frozenset({"gold"})
    metrics.observe_first_scheduled(0.5, 10, priority=-1, tenant="gold")
    metrics.observe_first_scheduled(0.25, 10, priority=0, tenant="someone")
    metrics.observe_first_scheduled(0.125, 10, priority=0, tenant="")
    name = "omnibus_request_queue_time_by_class_seconds_sum"
    assert value(metrics, name, priority="-1", tenant="gold") == 0.5
    assert value(metrics, name, priority="0", tenant="other") == 0.25
    assert value(metrics, name, priority="0", tenant="default") == 0.125
    assert value(metrics, "omnibus_request_queue_time_seconds_count") == 3


def test_admission_forecasts_are_compared_with_actual_lengths():
    metrics = ServingMetrics()
    metrics.observe_admission_forecast(40, 10)  # a quarter of the forecast
    metrics.observe_admission_forecast(20, 30)  # the forecast fell short
    name = "omnibus_admission_forecast_ratio"
    assert value(metrics, f"{name}_bucket", le="0.25") == 1
    assert value(metrics, f"{name}_bucket", le="1.25") == 1
    assert value(metrics, f"{name}_bucket", le="1.5") == 2
    assert value(metrics, f"{name}_sum") == 0.25 + 1.5
    assert value(metrics, "omnibus_admission_forecast_tokens_total") == 60
    assert value(metrics, "omnibus_admission_actual_tokens_total") == 40
