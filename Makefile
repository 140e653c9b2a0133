# deblend: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean train-mask-rcnn

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

# Deblend the bundled sample tiles into out/ with the default method.
run: $(STAMP)
	$(BIN)/deblend run data/ -o out/ --overwrite

# The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest

# Recipe of the shipped Mask R-CNN weights (2-core CPU: about 10.4 hours in nine stages, then 1.6 hours for the
# centre detector in two; see the model card and README *The shipped model*).
train-mask-rcnn: $(STAMP)
	$(BIN)/python pipelines/train_mask_rcnn.py --out runs/mask_rcnn_stage1.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage1.pt --n-train 5000 \
		--lr 5e-4 --steps 12000 --max-minutes 95 --checkpoints runs/checkpoints/mask_rcnn_stage2 \
		--out runs/mask_rcnn_stage2.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage2.pt --n-train 3000 \
		--train-seed 2 --correlated-fraction 0.5 --lr 3e-4 --steps 8000 --max-minutes 60 \
		--checkpoints runs/checkpoints/mask_rcnn_stage3 --out runs/mask_rcnn_stage3.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage3.pt --n-train 3000 \
		--train-seed 2 --correlated-fraction 0.5 --mask-head-channels 32,32 --train-only mask --lr 1e-3 \
		--steps 15000 --max-minutes 45 --checkpoints runs/checkpoints/mask_head32 --out runs/mask_rcnn_stage4.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage4.pt --n-train 5000 \
		--train-seed 3 --correlated-fraction 0.5 --lr 2e-4 --steps 12000 --max-minutes 90 \
		--checkpoints runs/checkpoints/mask_rcnn_stage6 --out runs/mask_rcnn_stage6.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage6.pt --n-train 4000 \
		--train-seed 4 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 --lr 2e-4 \
		--steps 16000 --max-minutes 62 --checkpoints runs/checkpoints/mask_rcnn_stage7 \
		--out runs/mask_rcnn_stage7.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage7.pt --n-train 5000 \
		--train-seed 6 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
		--blend-fraction 0.5,0.9 --density 100,400 --lr 1.5e-4 --steps 24000 --max-minutes 82 \
		--checkpoints runs/checkpoints/mask_rcnn_stage8 --out runs/mask_rcnn_stage8.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage8.pt --n-train 4000 \
		--train-seed 7 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
		--blend-fraction 0.35,0.85 --density 60,400 --lr 1e-4 --steps 20000 --max-minutes 66 \
		--checkpoints runs/checkpoints/mask_rcnn_stage9 --out runs/mask_rcnn_stage9.pt
	$(BIN)/python pipelines/train_mask_rcnn.py --init-from runs/mask_rcnn_stage9.pt --n-train 4000 \
		--train-seed 8 --correlated-fraction 0.5 --r-half-max 1.5,4 --space-fraction 0.25 \
		--blend-fraction 0.35,0.85 --density 60,400 --lr 1e-4 --steps 20000 --max-minutes 66 \
		--checkpoints runs/checkpoints/mask_rcnn_stage10 --out runs/mask_rcnn_stage10.pt
	$(BIN)/python pipelines/train_centre_net.py --n-train 4000 --train-seed 20 --max-minutes 60 \
		--out runs/centre_net.pt
	$(BIN)/python pipelines/train_centre_net.py --init-from runs/centre_net.pt --n-train 4000 \
		--train-seed 23 --correlated-fraction 0.8 --lr 1e-3 --steps 8000 --max-minutes 42 \
		--checkpoints runs/checkpoints/centre_net3 --out runs/centre_net3.pt
	$(BIN)/python pipelines/set_inference_options.py runs/mask_rcnn_stage10.pt --peak-proposals 100 \
		--contrast-peak-proposals 100 --centre-net runs/centre_net3.pt --centre-proposals 200 \
		--centre-threshold 0.2 --centre-operating-point 0.4 --centre-detect \
		--out deblend/weights/mask_rcnn_small.pt

lint: $(STAMP)
	$(BIN)/ruff check deblend tests pipelines notebooks

clean:
	rm -rf $(VENV) out
