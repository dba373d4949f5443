"""Read Prometheus' text exposition in tests: one sample's value, or a sum over label subsets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every `name` sample whose labels include `labels`."""
    return sum(
        value
        for sample_name, sample_labels, value in samples(text)
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


def label_values(text: str, name: str, label: str) -> set[str]:
    return {
        sample_labels[label]
        for sample_name, sample_labels, _ in samples(text)
        if sample_name == name and label in sample_labels
    }
