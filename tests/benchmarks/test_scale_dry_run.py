"""The Llama-2-7B dry run of docs/scale.md: shapes only, the block plan the driver walks."""

from benchmarks import scale_dry_run


def test_llama2_7b_dry_run_walks_the_block_plan():
  plan = scale_dry_run.dry_run("llama2_7b", sequences=128, length=2048)
  # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters.
  assert plan["params"] == 6_738_415_616
  assert len(plan["blocks"]) == 32
  # Block 0's inputs come from the model; every later block's from the block before.
  assert plan["anchors"] == ["layers/0"]
  assert plan["outside"] == [("lm_head", 1, 4096, 32_000)]
  block = plan["blocks"][5]
  assert [layer[0].split("/", 2)[2] for layer in block["layers"]] == [
      "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
      "mlp/up_proj", "mlp/down_proj"]
  assert [layer[2:] for layer in block["layers"]] == [
      (4096, 4096)] * 4 + [(4096, 11_008)] * 2 + [(11_008, 4096)]
  # bf16 parameters of one block; the largest group's Grams (the down projection).
  assert block["param_bytes"] == 2 * (4 * 4096 ** 2 + 3 * 4096 * 11_008 + 2 * 4096)
  assert block["sequential_gram_bytes"] == 4 * 11_008 ** 2
  assert block["hidden_bytes"] == 2 * 128 * 2048 * 4096 * 4
