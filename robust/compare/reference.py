"""The SaBN paper's published figures, quoted for comparison only (never mixed with our measurements)."""

# The reference's CIFAR-10 table (PreAct ResNet-18, Linf 8/255, 200 epochs; its README), quoted
# for comparison only. None means the paper reports no figure.
PAPER_CIFAR10 = {
    "source": "Gong et al., Sandwich Batch Normalization (WACV 2022), reference code README: "
              "CIFAR-10, PreAct ResNet-18, Linf eps 8/255, hybrid loss, 200 epochs",
    "rows": [
        {"norm": "bn", "route": "shared", "clean": 84.84, "pgd10": 41.57, "pgd20": 40.02},
        {"norm": "auxbn", "route": "adv", "clean": 83.42, "pgd10": 43.05, "pgd20": 41.60},
        {"norm": "sabn", "route": "adv", "clean": 84.08, "pgd10": 44.93, "pgd20": 43.14},
        {"norm": "auxbn", "route": "clean", "clean": 94.47, "pgd10": None, "pgd20": None},
        {"norm": "sabn", "route": "clean", "clean": 94.62, "pgd10": None, "pgd20": None},
    ],
}
