"""Train or evaluate CvT in one process (one GPU, or the CPU).

    python main_single_gpu.py -cfg configs/cvt-13-224x224.yaml -data_path /dataset/imagenet
    python main_single_gpu.py -cfg ... -data_path ... -eval -pretrained weights.pdparams
"""

import runtime
runtime.configure()  # before paddle: threads, MKL's code path, allocator

import engine
import utils
from config import get_config, update_config


def main() -> None:
    args = utils.get_arguments('Train or evaluate CvT in one process')
    config = update_config(get_config(), args)
    engine.run(config, multi_process=False)


if __name__ == '__main__':
    utils.report_errors(main)
