from vllm_kvcompress.eval.scoring import score, string_match_all, string_match_part


def test_match_all_is_the_share_of_references_found_case_insensitive():
    assert string_match_all("Alpha and BETA", ["alpha", "beta", "gamma", "delta"]) == 0.5
    assert string_match_all("nothing", ["x"]) == 0.0


def test_match_part_is_one_if_any_reference_is_found():
    assert string_match_part("the key is 123", ["999", "123"]) == 1.0
    assert string_match_part("the key is 123", ["999"]) == 0.0


def test_score_dispatches_on_the_metric_name():
    assert score("a b", ["a", "c"], "all") == 0.5
    assert score("a b", ["a", "c"], "part") == 1.0
