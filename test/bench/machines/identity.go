package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

// managerNamespace and managerServiceAccount are where the manager's identity lives, as
// config/ deploys it (less kustomize's name prefix).
const (
	managerNamespace      = "anvil-system"
	managerServiceAccount = "anvil-controller-manager"
)

// managerIdentity gives the manager what it has when deployed: a ServiceAccount token bound
// to config/rbac/role.yaml's ClusterRole. envtest's admin identity is a client certificate of
// system:masters, which the API server verifies on every request (about 5 % of its CPU in
// this benchmark) and which skips RBAC; a deployed manager pays neither. It returns the
// manager's configuration.
func managerIdentity(ctx context.Context, admin *rest.Config) (*rest.Config, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(filepath.Join(root, "config", "rbac", "role.yaml"))
	if err != nil {
		return nil, err
	}
	role := &rbacv1.ClusterRole{}
	if err := yaml.Unmarshal(raw, role); err != nil {
		return nil, fmt.Errorf("config/rbac/role.yaml: %w", err)
	}
	if role.Kind != "ClusterRole" || role.Name == "" {
		return nil, fmt.Errorf("config/rbac/role.yaml: want one named ClusterRole, found kind %q name %q", role.Kind, role.Name)
	}
	cs, err := kubernetes.NewForConfig(admin)
	if err != nil {
		return nil, err
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: managerNamespace}}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	sa, err := cs.CoreV1().ServiceAccounts(managerNamespace).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: managerServiceAccount}}, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	if _, err := cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: managerNamespace, Name: sa.Name}},
	}, metav1.CreateOptions{}); err != nil {
		return nil, err
	}
	tr, err := cs.CoreV1().ServiceAccounts(managerNamespace).CreateToken(ctx, sa.Name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](24 * 3600)}}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("requesting the manager's ServiceAccount token: %w", err)
	}
	return &rest.Config{Host: admin.Host, TLSClientConfig: rest.TLSClientConfig{CAData: admin.CAData, CAFile: admin.CAFile},
		BearerToken: tr.Status.Token}, nil
}
