"""The checkpoint I/O layer convert/, verify/ and training/ share. It imports only megatron_patch.errors,
models/ and runtime/ (never convert/, verify/, training/ or testing/; tests/test_imports.py checks).

    locate          which format a path holds (legacy torch, torch_dist), the tracker, training checkpoints
    safe_load       weights-only loading with an allowlist; DCP metadata through a restricted unpickler
    mcore_layout    Megatron-LM's legacy torch layout: rank directories, tracker, stored args, sizes
    hf_config       an HF config.json through transformers, the tensor shapes it implies
    hf_reader/_writer  safetensors, lazily sliced / sharded
    key_map         local-spec <-> Transformer Engine names, SequentialMLP <-> grouped experts
    engine          ShardPlan: the family table at a parallel layout (split, merge, place)
    plan_source     a Megatron state read as HF tensors; mcore_reader (torch), dist_reader (torch_dist)
    mcore_writer    the torch-format writer and the args it stores; dist_writer (torch_dist)
    chunks          the model chunks' sharded state dicts; loading a checkpoint into them
    output_check    what a converter read, checked against the HF config
    atomic          outputs renamed into place, locks, stale temporaries, --force markers
    tensors         dtypes by name, tensor bytes
"""
