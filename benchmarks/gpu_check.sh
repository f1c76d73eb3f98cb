# CUDA checks for a GPU machine with PyTorch but without amstream installed (run from the repo root).
# Prepare MNIST as IDX files first (they travel; the zarr source does not):
#   python -c "from amstream.datasets import load_dataset, write_idx; ..."  -> .gpu/mnist/*-ubyte.gz
# Results land in $OUT (set OUT=somewhere when running by hand).
set -x
export PYTHONPATH=$PWD AMSTREAM_DATA=${AMSTREAM_DATA:-$PWD/.gpu} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest tests/test_learner.py tests/test_functional.py -q -x -p no:cacheprovider -o addopts="" -k "cuda or round_trip or learns_digits" 2>&1 | tail -5
for a in 784-100-100-10 784-500-500-10; do python3 benchmarks/step_cost.py --device cuda --arch $a --steps 200 --json | tee -a $OUT/step_cost_cuda.jsonl; done
python3 benchmarks/step_cost.py --device cuda --arch 784-2000-2000-10 --batch-size 1024 --steps 100 --json | tee -a $OUT/step_cost_cuda.jsonl
timeout 240 python3 benchmarks/paper_figures.py --device cuda --archs 784-500-500-10 --epochs 3 --seeds 1 --methods am-adam am-mem adam --minibatches 50 --out $OUT/pf 2>&1 | grep -v "runs:" | tail -15
# beyond MLPs (issue 11): AM-Adam vs Adam per minibatch for LeNet-5, the sequential-MNIST RNN and the binary net
python3 benchmarks/step_cost.py --device cuda --arch lenet5 --steps 100 --json | tee -a $OUT/step_cost_cuda.jsonl
python3 benchmarks/step_cost.py --device cuda --arch 784-rnn15-10 --batch-size 1024 --steps 10 --warmup 2 --json | tee -a $OUT/step_cost_cuda.jsonl
python3 benchmarks/step_cost.py --device cuda --activation sign,tanh --steps 100 --json | tee -a $OUT/step_cost_cuda.jsonl
# issue 16, item 7: the time-to-accuracy race on CUDA with a larger batch (rates tuned on the validation split)
timeout 420 python3 benchmarks/time_to_accuracy.py --device cuda --arch 784-500-500-10 --batch-size 1000 --targets 0.97 --max-epochs 6 --seeds 1 2 3 --grid 1e-3 3e-3 8e-3 --no-progress --out $OUT/race_cuda 2>&1 | tail -12
