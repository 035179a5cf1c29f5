"""circuit-tracer graph JSON of an explanation (graphs.release.circuits), on a hand example."""

from __future__ import annotations

from graphs.release.circuits import circuit_json


def test_nodes_and_links_of_a_hand_explanation() -> None:
    position = {
        "position": 0,
        "token": "the",
        "predicted": " king",
        "probability": 0.5,
        "evidence": [(3, 2.0)],
        "implied": [{"feature": 4, "activation": 1.0, "from": [(3, 0.5)]}],
        "paths": [
            {
                "source": 3,
                "target": 7,
                "source_act": 2.0,
                "target_act": 1.5,
                "message": 0.25,
                "logit_effect": 2.0,
            }
        ],
        "direct": [{"feature": 3, "weight": 0.1}],
    }
    explanation = {
        "source_hook": "blocks.1.hook_resid_post",
        "target_hook": "blocks.3.hook_resid_post",
        "model": "tiny",
        "text": "the",
        "positions": [position],
    }
    graph = circuit_json(explanation, "00-the", [f"label {i}" for i in range(8)], n_layers=4)
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    assert list(nodes) == ["E_0", "4_0", "1_3_0", "1_4_0", "3_7_0"]
    assert nodes["1_3_0"]["clerp"] == "label 3" and nodes["3_7_0"]["clerp"] == ""  # target layer
    assert nodes["1_3_0"]["activation"] == 2.0 and nodes["4_0"]["is_target_logit"]
    links = {(link["source"], link["target"]): link["weight"] for link in graph["links"]}
    assert links == {
        ("E_0", "1_3_0"): 2.0,
        ("1_3_0", "1_4_0"): 0.5,
        ("1_3_0", "3_7_0"): 0.25,
        ("3_7_0", "4_0"): 3.0,
        ("1_3_0", "4_0"): 0.1,
    }
    assert graph["metadata"]["prompt_tokens"] == ["the"] and graph["metadata"]["slug"] == "00-the"
