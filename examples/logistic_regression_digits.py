"""Multinomial logistic regression on handwritten digits with fastreg.

A multinomial logistic regression predicts the probability of each of C classes as
``softmax(x W^T + b)``: its parameters are the weights of the input features, ``weight`` of
shape (C, D), and the bias term ``bias`` of shape (C,). It is trained by minimising the
cross-entropy loss with gradient-based optimisation.

This script walks through the whole workflow on scikit-learn's bundled 8x8 digit images
(1797 images, 64 pixel features, 10 classes):

1. the model, ``fastreg.nn.MultinomialLogisticRegression``, and its ``parameters()``;
2. training with ``model.fit(...)``: the whole mini-batch loop (shuffling, the fused loss
   linear layer + softmax + cross-entropy with its gradients, the ``fastreg.optim.Adam`` update)
   runs in C++, coming back to Python once per epoch for the history and the callback;
3. L2 regularisation through the optimizer's ``weight_decay`` (on the weights, not the bias);
4. freezing a parameter with ``requires_grad_(False)``;
5. early stopping on the validation loss (``validation_data``, ``patience``; the best epoch's
   parameters are restored), then predictions with ``predict`` / ``predict_proba``.

    python examples/logistic_regression_digits.py           # up to 200 epochs
    python examples/logistic_regression_digits.py --fast    # up to 60 epochs (used by the tests)
"""
import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastreg


def load_data(seed: int):
    """Train / validation / test split (60 / 20 / 20, stratified), features standardised with the
    training set's mean and standard deviation."""
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, test_size=0.4, stratify=y, random_state=seed)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, test_size=0.5, stratify=y_rest,
                                                    random_state=seed)
    mean, std = X_train.mean(0), X_train.std(0).clamp_min(1e-3)  # some border pixels are always 0
    return [((X_ - mean) / std, y_) for X_, y_ in ((X_train, y_train), (X_val, y_val), (X_test, y_test))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer epochs at most (for the tests)")
    parser.add_argument("--patience", type=int, default=5, help="early stopping: epochs without improvement")
    args = parser.parse_args()
    max_epochs = 60 if args.fast else 200
    torch.manual_seed(0)

    (X_train, y_train), (X_val, y_val), (X_test, y_test) = load_data(seed=0)
    n_features, n_classes = X_train.shape[1], int(y_train.max()) + 1
    print(f"digits: {len(X_train)} train / {len(X_val)} validation / {len(X_test)} test images, "
          f"{n_features} features, {n_classes} classes")

    # 1. The model and its parameters ----------------------------------------------------------
    model = fastreg.nn.MultinomialLogisticRegression(n_features, n_classes, bias=True)
    print(f"\nmodel: {model}")
    for name, p in model.named_parameters():
        print(f"  parameter {name:6s} shape {tuple(p.shape)}  requires_grad={p.requires_grad}")
    print(f"  trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")

    # 2./3. The optimizer. Two parameter groups: L2 regularisation (weight_decay adds
    # weight_decay * w to the gradient, the gradient of weight_decay/2 * ||w||^2) on the weights
    # only; the bias is left unpenalised, as is customary.
    opt = fastreg.optim.Adam([
        {"params": [model.weight], "weight_decay": 1e-3},
        {"params": [model.bias], "weight_decay": 0.0},
    ], lr=0.01)

    # 4. Freezing: hold the bias fixed for the first epochs (only the weights learn). fit() leaves
    # parameters that do not require grad untouched, as the optimizer skips parameters without a
    # gradient in a Python loop.
    freeze_epochs = 3
    model.bias.requires_grad_(False)
    bias_before = model.bias.detach().clone()
    print(f"\nbias frozen for the first {freeze_epochs} epochs: "
          f"trainable parameters now {sum(p.numel() for p in model.parameters() if p.requires_grad)}")

    def report(epoch, model, history):  # called by fit() after every epoch
        print(f"epoch {len(all_epochs) + 1:3d}  train loss {history['loss'][-1]:.4f}  "
              f"val loss {history['val_loss'][-1]:.4f}  val accuracy {history['val_score'][-1]:.4f}")
        all_epochs.append(history["val_loss"][-1])

    all_epochs: list = []
    batch_size = 64
    generator = torch.Generator().manual_seed(0)  # the shuffling of every epoch
    model.fit(X_train, y_train, optimizer=opt, epochs=freeze_epochs, batch_size=batch_size, generator=generator,
              validation_data=(X_val, y_val), restore_best=False, callback=report)
    print(f"bias unchanged while frozen: {torch.equal(model.bias, bias_before)}")
    model.bias.requires_grad_(True)
    print("bias unfrozen")

    # 5. Training with early stopping on the validation loss -----------------------------------
    # The optimizer's state (step counts, moments) simply continues from the first fit.
    model.fit(X_train, y_train, optimizer=opt, epochs=max_epochs - freeze_epochs, batch_size=batch_size,
              generator=generator, validation_data=(X_val, y_val), patience=args.patience, tol=1e-4,
              callback=report)
    h = model.history_
    if h["stopped_early"]:
        print(f"early stopping at epoch {freeze_epochs + h['epochs']}: no validation improvement for "
              f"{args.patience} epochs")
    best_epoch = freeze_epochs + h["best_epoch"] + 1
    print(f"restored the parameters of epoch {best_epoch} (best validation loss {min(h['val_loss']):.4f})")

    # Evaluation and predictions ---------------------------------------------------------------
    with torch.no_grad():
        test_acc = (model.predict(X_test) == y_test).float().mean().item()
        print(f"\ntest accuracy: {test_acc:.4f}")
        proba = model.predict_proba(X_test[:5])
        for p, label in zip(proba, y_test[:5].tolist()):
            top = p.argmax().item()
            print(f"  true digit {label}: predicted {top} with probability {p[top]:.3f}")
        # Interpretation: each class has one weight per pixel; the largest ones mark the pixels
        # whose ink speaks most for that digit.
        strongest = model.weight.abs().mean(0).topk(5).indices.tolist()
        print("pixels (row, col) with the largest average |weight|: "
              + ", ".join(f"({i // 8}, {i % 8})" for i in strongest))
        print("weight norm per class: " + " ".join(f"{n:.2f}" for n in model.weight.norm(dim=1).tolist()))


if __name__ == "__main__":
    main()
