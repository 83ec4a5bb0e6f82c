"""Linear regression with fastreg: predict crop yields from the weather.

The data is the classic toy set of the "Gradient Descent and Linear Regression with PyTorch"
tutorial: for 15 regions, the average temperature (F), rainfall (mm) and humidity (%), and the
yield of apples and oranges (tons per hectare). The model is

    yield_apple  = w11 * temp + w12 * rainfall + w13 * humidity + b1
    yield_orange = w21 * temp + w22 * rainfall + w23 * humidity + b2

i.e. one linear layer with weight (2, 3) and bias (2,), fitted by mini-batch stochastic gradient
descent on the mean squared error. ``fastreg.nn.LinearRegression`` is that model: ``model.loss``
is the fused linear + mean-squared-error op (``fastreg.linear_mse_loss``), ``model.score`` the R^2
of scikit-learn, and ``fastreg.optim.SGD`` a drop-in ``torch.optim.SGD`` whose step is one fused
kernel call. The script first writes the training loop out in Python, then fits a second model
with ``model.fit(...)``, which runs the same loop in C++.

    python examples/linear_regression.py            # 100 epochs
    python examples/linear_regression.py --fast     # 40 epochs (used by the tests)
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastreg

# Inputs: temperature, rainfall, humidity.
inputs = torch.tensor([
    [73, 67, 43], [91, 88, 64], [87, 134, 58], [102, 43, 37], [69, 96, 70],
    [74, 66, 43], [91, 87, 65], [88, 134, 59], [101, 44, 37], [68, 96, 71],
    [73, 66, 44], [92, 87, 64], [87, 135, 57], [103, 43, 36], [68, 97, 70],
], dtype=torch.float32)
# Targets: apples, oranges.
targets = torch.tensor([
    [56, 70], [81, 101], [119, 133], [22, 37], [103, 119],
    [57, 69], [80, 102], [118, 132], [21, 38], [104, 118],
    [57, 69], [82, 100], [118, 134], [20, 38], [102, 120],
], dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer epochs (for the tests)")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or (40 if args.fast else 100)
    torch.manual_seed(42)

    # Batches of 5 rows, reshuffled every epoch: "stochastic" gradient descent.
    train_dl = DataLoader(TensorDataset(inputs, targets), batch_size=5, shuffle=True)

    model = fastreg.nn.LinearRegression(3, 2)  # weight (2, 3), bias (2,), initialised like nn.Linear
    # The inputs are not rescaled (values around 40-130), hence the small learning rate.
    opt = fastreg.optim.SGD(model.parameters(), lr=1e-5)

    for epoch in range(1, epochs + 1):
        total, batches = 0.0, 0
        for xb, yb in train_dl:
            loss = model.loss(xb, yb)         # 1. predict, 2. measure the error (fused linear + MSE)
            loss.backward()                   # 3. gradients of the loss w.r.t. weight and bias
            opt.step()                        # 4. w -= lr * dL/dw (one fused kernel call)
            opt.zero_grad()                   # 5. reset the gradients for the next batch
            total += loss.item()
            batches += 1
        print(f"epoch {epoch:3d}/{epochs}  loss {total / batches:10.4f}")

    with torch.no_grad():
        full_loss = F.mse_loss(model(inputs), targets).item()
        print(f"\nmean squared error on all 15 regions: {full_loss:.4f}")
        print(f"R^2 on all 15 regions: {model.score(inputs, targets):.4f}")
        print("learned weights (rows: apples, oranges; columns: temperature, rainfall, humidity):")
        for name, row in zip(("apples ", "oranges"), model.weight):
            print(f"  {name}  " + "  ".join(f"{w:+.4f}" for w in row.tolist()))
        print("learned bias: " + "  ".join(f"{b:+.4f}" for b in model.bias.tolist()))

        print("\npredictions vs targets (apples, oranges):")
        for pred, target in zip(model(inputs[:5]), targets[:5]):
            print(f"  predicted {pred[0]:6.1f} {pred[1]:6.1f}   actual {target[0]:5.0f} {target[1]:5.0f}")
        new_region = torch.tensor([[75.0, 63.0, 44.0]])
        apples, oranges = model(new_region)[0].tolist()
        print(f"\nnew region (temp 75, rainfall 63, humidity 44): {apples:.1f} t/ha apples, {oranges:.1f} t/ha oranges")

    # The same training with fit(): the batch loop (shuffle, loss and gradients, SGD update) runs in
    # C++. Its batches come in another random order than the DataLoader's, so the result is close
    # to, not equal to, the loop's; with the loop written over torch.randperm(15, generator=g) it
    # would be equal to rounding (tests/test_fit.py checks that).
    torch.manual_seed(42)
    twin = fastreg.nn.LinearRegression(3, 2)
    twin.fit(inputs, targets, optimizer=fastreg.optim.SGD(twin.parameters(), lr=1e-5), epochs=epochs, batch_size=5,
             generator=torch.Generator().manual_seed(0))
    print(f"\nfit(): {twin.n_iter_} epochs, last epoch loss {twin.history_['loss'][-1]:.4f}, "
          f"R^2 {twin.score(inputs, targets):.4f}")


if __name__ == "__main__":
    main()
