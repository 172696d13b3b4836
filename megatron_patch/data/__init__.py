"""Data for training: preprocessing text into Megatron indexed datasets (.bin/.idx) and the GPT
dataset / batch stream the train loop reads (megatron-core's GPTDataset underneath).

    megatron-patch preprocess --input data.jsonl --tokenizer DIR --output-prefix P --append-eod
    stream = GPTBatches.build(prefix, seq_length, global_batch_size, train_iters, seed, eod, vocab)
"""
