"""CIFAR-10 as an ImageFolder of PNG files (``examples.cifar10_to_imagefolder``)
through this example's grain pipeline: ResNet18 at 32x32, a few hundred steps.

The only run of the pipeline on real images that fits a CPU; the crops are
ImageNet's (random-resized crop of the 32x32 image, resized back to 32; the
evaluation resize is the identity), so accuracy is below a CIFAR-tuned
pipeline's.
"""

from examples.imagenet_resnet18.train import Config


def get_config() -> Config:
  return Config(method="laq", image_size=32, resize_size=32, warmup_epochs=0.1,
                num_epochs=1.0, num_train_steps=300, batch_size=128, log_every_steps=50,
                eval_every_steps=300, checkpoint_every_steps=300, num_data_threads=4)
