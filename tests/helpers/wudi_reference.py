"""WUDI as its authors write it: the dense updates stacked, the loss sum_i ||(m - t_i) t_i^T||^2 / ||t_i||^2
differentiated by autograd, Adam from the sum."""

import torch


def wudi(updates, iterations, lr):
    vectors = torch.stack(updates)
    merging = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    norms = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(iterations):
        inner = torch.matmul(merging.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging.detach()
