set -x
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv
python3 -c "import yaml, tqdm, tensorboard, matplotlib, transformers, peft; print(transformers.__version__, peft.__version__)"
timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_data.py -x -k "not minilm and not builtin and not classifier and not offline and not csv_parquet and not hub" 2>&1 | tail -25
