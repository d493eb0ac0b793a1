"""Example finetail plugins, one of each kind (finetail.plugins has the contracts):

- ``losses.SoftmaxEqualizationLoss``: the softmax equalization loss (Tan et al., CVPR 2020);
- ``posthoc.balance_prediction_rate``: per-class logit offsets that make the cell predict
  every class equally often on its held-out training images;
- ``scores.gbc``: the Gaussian Bhattacharyya coefficient (Pándy et al., CVPR 2022).

Installed (``pip install -e examples/finetail-extras``), they are the entry points ``seql``,
``rate_balance`` and ``gbc`` (``installed.yaml``); not installed, a study file beside this
package names them ``finetail_extras.losses:SoftmaxEqualizationLoss`` and so on (``study.yaml``),
or any study file does with ``examples/finetail-extras`` on ``PYTHONPATH``.
"""

__version__ = "0.1.0"
