"""CIFAR-10 as an ImageFolder of PNG files (``examples.cifar10_to_imagefolder``)
through this example's grain pipeline: ResNet18 at 32x32, a few hundred steps.

The only run of the pipeline on real images that fits a CPU; the crops are
ImageNet's (random-resized crop of the 32x32 image, resized back to 32; the
evaluation resize is the identity), so accuracy is below a CIFAR-tuned
pipeline's.
"""

from examples.imagenet_resnet18.train import Config


def get_config() -> Config:
  return Config(model="ResNet18", bits=1, first_last_bits=8, optimizer="laq", a=0.9,
                image_size=32, resize_size=32, learning_rate=1e-3, warmup_epochs=0.1,
                num_epochs=1.0, num_train_steps=300, batch_size=128, half_precision=True,
                parallel="jit", log_every_steps=50, eval_every_steps=300, steps_per_eval=-1,
                checkpoint_every_steps=300, num_data_threads=4)
