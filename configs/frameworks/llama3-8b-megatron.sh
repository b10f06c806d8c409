# Llama-3-8B pretraining with Megatron-LM on two 8-GPU nodes: TP 2 with sequence parallelism,
# two pipeline stages, the distributed optimizer, selective recompute, 8K context.
torchrun --nnodes 2 --nproc-per-node 8 pretrain_gpt.py \
  --tensor-model-parallel-size 2 --sequence-parallel \
  --pipeline-model-parallel-size 2 \
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
  --recompute-granularity selective \
  --micro-batch-size 1 --global-batch-size 512 --seq-length 8192 \
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 \
  --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128 \
  --vocab-size 128256 --untie-embeddings-and-output-weights \
  --max-position-embeddings 8192 --position-embedding-type rope --rotary-base 500000 \
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear \
  --attention-dropout 0 --hidden-dropout 0 \
  --bf16 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --weight-decay 0.1 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model meta-llama/Meta-Llama-3-8B \
  --data-path /data/llama3/text_document --split 99,1,0 \
  --log-interval 10 --save-interval 1000 --eval-interval 1000
